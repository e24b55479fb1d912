/* memtop leak test program: leaks a known number of blocks from functions with distinctive names while
 * allocating and freeing a lot elsewhere. The test drives it through stdin, one command per line, and
 * reads one line of reply for each:
 *
 *   run   leak LEAK_BLOCKS x LEAK_SIZE bytes (malloc), CALLOC_BLOCKS x CALLOC_SIZE (calloc), one
 *         posix_memalign block, one anonymous mmap, and a realloc chain that ends with one block, all
 *         interleaved with CHURN_ROUNDS malloc/free pairs and mmap/munmap pairs; replies "ran"
 *   free  free every leaked block and the chain; replies "freed"
 *   miss  map a block, unmap it behind the probe's back (raw syscall), map again; replies "same" when the
 *         second mapping got the first one's address (a free the probe missed), else "moved"
 *   exit  replies "bye" and exits
 *
 * Built by the test with gcc -g -O0 -fno-omit-frame-pointer -fno-inline: symbols name the functions and
 * frame pointers let BPF walk the user stacks.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#define LEAK_BLOCKS 200
#define LEAK_SIZE 4096
#define CALLOC_BLOCKS 50
#define CALLOC_SIZE 1000
#define MEMALIGN_SIZE 8192
#define MMAP_SIZE (256 * 1024)
#define CHURN_ROUNDS 200
#define CHURN_PER_ROUND 100
#define CHAIN_STEPS 12
#define CHAIN_FINAL_SIZE (16 * (CHAIN_STEPS + 1) * 100)

static void *leaked[LEAK_BLOCKS];
static void *calloced[CALLOC_BLOCKS];
static void *aligned_block;
static void *mapped;
static void *chain;
static volatile unsigned long sink;

__attribute__((noinline)) void *memtop_test_leak_here(size_t size) {
    void *p = malloc(size);
    memset(p, 0xab, size);
    return p;
}

__attribute__((noinline)) void *memtop_test_calloc_leak(void) {
    return calloc(10, CALLOC_SIZE / 10);
}

__attribute__((noinline)) void *memtop_test_memalign_leak(void) {
    void *p = NULL;
    if (posix_memalign(&p, 64, MEMALIGN_SIZE) != 0)
        return NULL;
    return p;
}

__attribute__((noinline)) void *memtop_test_mmap_leak(void) {
    void *p = mmap(NULL, MMAP_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

/* Allocates and frees: nothing from here should stay outstanding. */
__attribute__((noinline)) void memtop_test_churn(void) {
    void *blocks[CHURN_PER_ROUND];
    for (int i = 0; i < CHURN_PER_ROUND; i++) {
        blocks[i] = malloc(32 + (i % 16) * 64);
        sink += (unsigned long)blocks[i];
    }
    for (int i = 0; i < CHURN_PER_ROUND; i++)
        free(blocks[i]);
    void *m = mmap(NULL, 64 * 1024, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m != MAP_FAILED)
        munmap(m, 64 * 1024);
}

/* Grows one block step by step: only the final block stays outstanding. */
__attribute__((noinline)) void *memtop_test_realloc_chain(void) {
    void *p = malloc(16);
    for (int step = 1; step <= CHAIN_STEPS; step++) {
        void *bigger = realloc(p, 16 * (step + 1) * 100);
        if (!bigger)
            return p;
        p = bigger;
        memtop_test_churn(); /* so the allocator cannot always grow it in place */
    }
    return p;
}

/* A free the probe cannot see, then the address allocated again: counted as a missed free. */
__attribute__((noinline)) int memtop_test_missed_free(void) {
    size_t size = 64 * 1024;
    void *first = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    syscall(SYS_munmap, first, size);
    void *second = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    munmap(second, size);
    return first == second;
}

static void run(void) {
    int churn = 0;
    for (int i = 0; i < LEAK_BLOCKS; i++) {
        leaked[i] = memtop_test_leak_here(LEAK_SIZE);
        if (i < CALLOC_BLOCKS)
            calloced[i] = memtop_test_calloc_leak();
        if (churn < CHURN_ROUNDS) {
            memtop_test_churn();
            churn++;
        }
    }
    while (churn++ < CHURN_ROUNDS)
        memtop_test_churn();
    aligned_block = memtop_test_memalign_leak();
    mapped = memtop_test_mmap_leak();
    chain = memtop_test_realloc_chain();
}

static void release(void) {
    for (int i = 0; i < LEAK_BLOCKS; i++)
        free(leaked[i]);
    for (int i = 0; i < CALLOC_BLOCKS; i++)
        free(calloced[i]);
    free(aligned_block);
    if (mapped)
        munmap(mapped, MMAP_SIZE);
    free(chain);
}

int main(void) {
    char line[64];
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready\n");
    while (fgets(line, sizeof(line), stdin)) {
        if (strncmp(line, "run", 3) == 0) {
            run();
            printf("ran\n");
        } else if (strncmp(line, "free", 4) == 0) {
            release();
            printf("freed\n");
        } else if (strncmp(line, "miss", 4) == 0) {
            printf(memtop_test_missed_free() ? "same\n" : "moved\n");
        } else if (strncmp(line, "exit", 4) == 0) {
            printf("bye\n");
            return 0;
        } else {
            printf("unknown command\n");
        }
    }
    return 0;
}
