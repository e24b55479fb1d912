/* N child processes that each make one kmalloc (a 256-byte listxattr buffer) every PERIOD_MS, until the
 * parent is killed: a busy host's process table, for memtop's tests and benchmarks.
 * usage: busy_children N PERIOD_MS
 * Prints "ready N" once every child runs; each child exits when its parent does (PR_SET_PDEATHSIG). */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <time.h>
#include <unistd.h>

static char buf[256];

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 100;
    long period_ms = argc > 2 ? atol(argv[2]) : 500;
    struct timespec period = {period_ms / 1000, (period_ms % 1000) * 1000000L};
    pid_t parent = getpid();
    for (int i = 0; i < n; i++) {
        pid_t pid = fork();
        if (pid < 0) {
            perror("fork");
            return 1;
        }
        if (pid == 0) {
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            if (getppid() != parent)
                _exit(0);
            /* spread the children over the period so the load is even */
            struct timespec offset = {0, (long)((period_ms * 1000000L / (n ? n : 1)) * i % 1000000000L)};
            nanosleep(&offset, NULL);
            for (;;) {
                listxattr("/", buf, sizeof buf);
                nanosleep(&period, NULL);
            }
        }
    }
    printf("ready %d\n", n);
    fflush(stdout);
    for (;;)
        pause();
}
