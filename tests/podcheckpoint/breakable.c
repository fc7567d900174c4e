/* A workload CRIU can dump until it gets SIGUSR1, and not after: it then opens a userfaultfd,
 * which CRIU refuses to dump (an anonymous inode it does not know). Every second it prints its
 * count; after the signal it says what it opened. Built statically by conftest.py. */
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define UFFD_USER_MODE_ONLY 1

static volatile sig_atomic_t asked;

static void on_usr1(int sig) { (void)sig; asked = 1; }

int main(void) {
    signal(SIGUSR1, on_usr1);
    unsigned long count = 0;
    int fd = -1;
    for (;;) {
        struct timespec d = {0, 100 * 1000000L};
        nanosleep(&d, NULL);
        if (asked && fd < 0) {
            fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | UFFD_USER_MODE_ONLY);
            printf(fd >= 0 ? "broken uffd=%d\n" : "could not break: userfaultfd failed (%d)\n", fd);
            fflush(stdout);
        }
        if (++count % 10 == 0) {
            printf("count=%lu\n", count);
            fflush(stdout);
        }
    }
}
