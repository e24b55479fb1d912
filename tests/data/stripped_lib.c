/* memtop test library, built as a shared object and then stripped (strip --strip-unneeded): only its
 * exported function keeps a name. The hidden helper, placed right after it, leaks HIDDEN_BLOCKS blocks; a
 * symbolizer that names frames after the nearest preceding symbol calls it memtop_exported_entry+0x... */
#include <stdlib.h>

#define HIDDEN_BLOCKS 20
static void *kept[HIDDEN_BLOCKS];

static void *memtop_hidden_helper(int i);

void memtop_exported_entry(void) {
    for (int i = 0; i < HIDDEN_BLOCKS; i++)
        kept[i] = memtop_hidden_helper(i);
}

__attribute__((noinline)) static void *memtop_hidden_helper(int i) {
    volatile int pad = i;
    return malloc(512 + pad * 0);
}
