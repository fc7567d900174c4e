/* memsnap's pod-migration test workload (built statically by conftest.py).
 * A random token, MIB MiB of data derived from it, and a counter, all in memory. Every TICK ms it
 * counts and writes one page of a scratch area (memory keeps being dirtied); every second it
 * prints: token, count, checksum of the data (recomputed: memory exact), the longest gap between
 * two ticks so far (the pause it felt) and its pid. A restart shows as a new token and count 1. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#define TICK_MS 10

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);  /* not MONOTONIC: CRIU restores into a time namespace that hides the pause */
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static uint64_t checksum(const uint64_t *p, size_t n) {
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 1099511628211ULL;
    return h;
}

int main(int argc, char **argv) {
    size_t mib = argc > 1 ? strtoul(argv[1], NULL, 10) : 64;
    size_t words = mib << 17, scratch_pages = 256;
    uint64_t token = 0;
    if (getrandom(&token, sizeof token, 0) != sizeof token) return 1;
    uint64_t *data = malloc(words * 8), x = token | 1;
    char *scratch = malloc(scratch_pages * 4096);
    if (!data || !scratch) return 1;
    for (size_t i = 0; i < words; i++) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; data[i] = x; }
    uint64_t sum = checksum(data, words);
    printf("start token=%016llx sum=%016llx mib=%zu\n", (unsigned long long)token, (unsigned long long)sum, mib);
    fflush(stdout);
    unsigned long count = 0;
    double last = now_ms(), printed = last, maxgap = 0;
    for (;;) {
        struct timespec d = {0, TICK_MS * 1000000L};
        nanosleep(&d, NULL);
        double t = now_ms();
        if (t - last > maxgap) maxgap = t - last;
        last = t;
        count++;
        memset(scratch + (count % scratch_pages) * 4096, (int)count, 4096);
        if (t - printed >= 1000) {
            printed = t;
            printf("token=%016llx count=%lu sum=%016llx maxgap_ms=%.1f\n", (unsigned long long)token, count,
                   (unsigned long long)checksum(data, words), maxgap);
            fflush(stdout);
        }
    }
}
