/* memtop test program: allocator calls that fail, and what they must leave outstanding. Each command
 * (one line on stdin) runs one kind from its own distinctively named function and replies "done":
 *
 *   realloc_fail       1000 x malloc(100), each realloc'ed to an impossible size (NULL; the block stays)
 *   realloc_zero       10 x malloc(100), each realloc'ed to 0 bytes (freed)
 *   realloc_null       10 x realloc(NULL, 300) (a malloc)
 *   reallocarray_fail  500 x malloc(200), each reallocarray'ed with an overflowing count (NULL; stays)
 *   memalign_fail      posix_memalign with a bad alignment and with an impossible size (error codes;
 *                      the out-parameter holds a sentinel that must not be taken for a block)
 *   aligned_fail       aligned_alloc, memalign, valloc, pvalloc, calloc, malloc of impossible sizes
 *   mmap_fail          an anonymous mmap of an impossible size (MAP_FAILED)
 *   mremap_fail        mmap 64 KiB, then mremap it in place to an impossible size (fails; the 64 KiB stay)
 *   mremap_move        mmap 64 KiB, then mremap it to 128 KiB, allowed to move (128 KiB outstanding)
 *   munmap_partial     mmap 4 pages, munmap the first one (3 pages outstanding)
 *   munmap_fail        mmap 2 pages, munmap with length 0 (EINVAL; the 2 pages stay)
 *
 * Built by the test with gcc -g -O0 -fno-omit-frame-pointer -fno-inline.
 */
#define _GNU_SOURCE
#include <malloc.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define KEPT 1000
static void *kept[KEPT];
static void *mapping;
static volatile size_t impossible = SIZE_MAX / 2 + 1; /* volatile: the compiler must not see it fail */

__attribute__((noinline)) void *memtop_kept_by_failed_realloc(void) {
    return malloc(100);
}

__attribute__((noinline)) void *memtop_freed_by_realloc_zero(void) {
    return malloc(100);
}

__attribute__((noinline)) void *memtop_realloc_null(void) {
    return realloc(NULL, 300);
}

__attribute__((noinline)) void *memtop_kept_by_failed_reallocarray(void) {
    return malloc(200);
}

__attribute__((noinline)) int memtop_failed_memalign(void) {
    void *p = (void *)0x10000; /* a sentinel: a failed call leaves it alone */
    int failures = posix_memalign(&p, 3, 100) != 0;
    failures += posix_memalign(&p, 64, impossible) != 0;
    return failures;
}

__attribute__((noinline)) int memtop_failed_aligned(void) {
    int nulls = aligned_alloc(64, impossible) == NULL;
    nulls += memalign(64, impossible) == NULL;
    nulls += valloc(impossible) == NULL;
    nulls += pvalloc(impossible) == NULL;
    nulls += calloc(impossible, 4) == NULL;
    nulls += malloc(impossible) == NULL;
    return nulls;
}

__attribute__((noinline)) int memtop_failed_mmap(void) {
    return mmap(NULL, impossible, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0) == MAP_FAILED;
}

__attribute__((noinline)) void *memtop_kept_by_failed_mremap(void) {
    return mmap(NULL, 65536, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
}

__attribute__((noinline)) void *memtop_moved_by_mremap(void) {
    return mmap(NULL, 65536, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
}

__attribute__((noinline)) void *memtop_partly_unmapped(void) {
    return mmap(NULL, 4 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
}

__attribute__((noinline)) void *memtop_kept_by_failed_munmap(void) {
    return mmap(NULL, 2 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
}

static int run(const char *cmd) {
    if (!strcmp(cmd, "realloc_fail")) {
        for (int i = 0; i < KEPT; i++) {
            kept[i] = memtop_kept_by_failed_realloc();
            if (realloc(kept[i], impossible) != NULL)
                return 0;
        }
    } else if (!strcmp(cmd, "realloc_zero")) {
        for (int i = 0; i < 10; i++)
            free(realloc(memtop_freed_by_realloc_zero(), 0)); /* glibc: NULL, freed; others: a new block */
    } else if (!strcmp(cmd, "realloc_null")) {
        for (int i = 0; i < 10; i++)
            kept[i] = memtop_realloc_null();
    } else if (!strcmp(cmd, "reallocarray_fail")) {
        for (int i = 0; i < 500; i++) {
            kept[i] = memtop_kept_by_failed_reallocarray();
            if (reallocarray(kept[i], impossible, 4) != NULL)
                return 0;
        }
    } else if (!strcmp(cmd, "memalign_fail")) {
        return memtop_failed_memalign() == 2;
    } else if (!strcmp(cmd, "aligned_fail")) {
        return memtop_failed_aligned() == 6;
    } else if (!strcmp(cmd, "mmap_fail")) {
        return memtop_failed_mmap();
    } else if (!strcmp(cmd, "mremap_fail")) {
        mapping = memtop_kept_by_failed_mremap();
        return mremap(mapping, 65536, impossible, 0) == MAP_FAILED;
    } else if (!strcmp(cmd, "mremap_move")) {
        mapping = memtop_moved_by_mremap();
        mapping = mremap(mapping, 65536, 131072, MREMAP_MAYMOVE);
        return mapping != MAP_FAILED;
    } else if (!strcmp(cmd, "munmap_partial")) {
        mapping = memtop_partly_unmapped();
        return munmap(mapping, 4096) == 0;
    } else if (!strcmp(cmd, "munmap_fail")) {
        mapping = memtop_kept_by_failed_munmap();
        return munmap(mapping, 0) != 0;
    } else {
        return 0;
    }
    return 1;
}

int main(void) {
    char line[64];
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready\n");
    while (fgets(line, sizeof(line), stdin)) {
        line[strcspn(line, "\n")] = 0;
        printf(run(line) ? "done\n" : "unexpected\n");
    }
    return 0;
}
