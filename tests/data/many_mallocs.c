/* memtop test program: THREADS threads each malloc(4) PER_THREAD times and keep every block (8,000,000
 * outstanding allocations, 32,000,000 bytes: far more than the probe's address map holds, so only a sampled
 * estimate can be right). "run" on stdin starts them and replies "done" when all have finished.
 * Built with gcc -g -O0 -fno-omit-frame-pointer -fno-inline -pthread. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define THREADS 8
#define PER_THREAD 1000000

static void *blocks[THREADS][PER_THREAD];

__attribute__((noinline)) void *memtop_many_small(void) {
    return malloc(4);
}

static void *worker(void *arg) {
    void **mine = arg;
    for (int i = 0; i < PER_THREAD; i++)
        mine[i] = memtop_many_small();
    return NULL;
}

int main(void) {
    char line[64];
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready\n");
    while (fgets(line, sizeof(line), stdin)) {
        if (strncmp(line, "run", 3) != 0)
            continue;
        pthread_t threads[THREADS];
        for (int t = 0; t < THREADS; t++)
            pthread_create(&threads[t], NULL, worker, blocks[t]);
        for (int t = 0; t < THREADS; t++)
            pthread_join(threads[t], NULL);
        printf("done\n");
    }
    return 0;
}
