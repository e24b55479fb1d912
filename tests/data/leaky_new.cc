// memtop test program: leaks through operator new[] (and new), for linking against another allocator
// (tcmalloc, jemalloc). "run" leaks BLOCKS x BLOCK_SIZE bytes with new[] and BLOCKS objects with new,
// news and deletes as many, and replies "ran". "throw" makes new[] throw bad_alloc three times, catches it
// and replies "caught N". Built with g++ -g -O0 -fno-omit-frame-pointer -fno-inline.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <new>

#define BLOCKS 100
#define BLOCK_SIZE 10000

struct Node {
    char payload[48];
};

static char *arrays[BLOCKS];
static Node *nodes[BLOCKS];

__attribute__((noinline)) char *memtop_leak_new_array(void) {
    char *p = new char[BLOCK_SIZE];
    std::memset(p, 1, BLOCK_SIZE);
    return p;
}

__attribute__((noinline)) Node *memtop_leak_new_object(void) {
    return new Node();
}

__attribute__((noinline)) void memtop_new_and_delete(void) {
    for (int i = 0; i < BLOCKS; i++) {
        char *p = new char[777];
        delete[] p;
        Node *n = new Node();
        delete n;
    }
}

__attribute__((noinline)) int memtop_new_that_throws(void) {
    int caught = 0;
    for (int i = 0; i < 3; i++) {
        try {
            volatile size_t impossible = SIZE_MAX / 4;
            char *p = new char[impossible];
            p[0] = 1;
        } catch (const std::bad_alloc &) {
            caught++;
        }
    }
    return caught;
}

int main() {
    char line[64];
    setvbuf(stdout, nullptr, _IOLBF, 0);
    std::printf("ready\n");
    while (std::fgets(line, sizeof(line), stdin)) {
        if (std::strncmp(line, "run", 3) == 0) {
            for (int i = 0; i < BLOCKS; i++) {
                arrays[i] = memtop_leak_new_array();
                nodes[i] = memtop_leak_new_object();
            }
            memtop_new_and_delete();
            std::printf("ran\n");
        } else if (std::strncmp(line, "throw", 5) == 0) {
            std::printf("caught %d\n", memtop_new_that_throws());
        }
    }
    return 0;
}
