"""Kernel ABI, one module per interface: numbers, structs and thin ctypes calls, no policy.

libc (syscalls, ioctl numbers), arch, ptrace, userfaultfd, pagemap, pidfd, vm
(process_vm_readv), seccomp; and for memsnap's own kernel patch (kernel/README.md):
write_events (mark, re-arm, unmark through madvise/process_madvise) and tracefs (a tracefs
instance of our own recording the memsnap events).
"""
