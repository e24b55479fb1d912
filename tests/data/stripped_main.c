/* memtop test program: calls into the stripped library (stripped_lib.c) on "run", replies "ran". */
#include <stdio.h>
#include <string.h>

void memtop_exported_entry(void);

int main(void) {
    char line[64];
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready\n");
    while (fgets(line, sizeof(line), stdin)) {
        if (strncmp(line, "run", 3) == 0) {
            memtop_exported_entry();
            printf("ran\n");
        }
    }
    return 0;
}
