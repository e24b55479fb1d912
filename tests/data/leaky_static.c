/* memtop test program, linked statically (musl-gcc -static): its malloc lives in the executable itself.
 * "run" leaks BLOCKS x BLOCK_SIZE bytes with malloc, mallocs and frees as many, and replies "ran". */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BLOCKS 100
#define BLOCK_SIZE 3000

static void *leaked[BLOCKS];

__attribute__((noinline)) void *memtop_static_leak(void) {
    void *p = malloc(BLOCK_SIZE);
    memset(p, 1, BLOCK_SIZE);
    return p;
}

int main(void) {
    char line[64];
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready\n");
    while (fgets(line, sizeof(line), stdin)) {
        if (strncmp(line, "run", 3) == 0) {
            for (int i = 0; i < BLOCKS; i++) {
                leaked[i] = memtop_static_leak();
                free(malloc(100));
            }
            printf("ran\n");
        }
    }
    return 0;
}
