// memtop kernel leak probe, on its own: the kernel leak programs of leaks_kernel.h plus their own
// kmem:kmalloc program. Live mode normally compiles leaks_kernel.h into kmalloc.c instead (one program
// per tracepoint for both panels); this file is what runs when that fails, or when the leak probe is used
// alone (benchmarks, tests).

#include "leaks_kernel.h"

#if RAW_KMALLOC
// Raw tracepoint: args are trace_kmalloc's (call_site, ptr, bytes_req, bytes_alloc, gfp_flags, node).
RAW_TRACEPOINT_PROBE(kmalloc) {
    leak_kmalloc(ctx, (u64)ctx->args[1], (u64)ctx->args[3]);
    return 0;
}
#else
TRACEPOINT_PROBE(kmem, kmalloc) {
    leak_kmalloc(args, (u64)args->ptr, args->bytes_alloc);
    return 0;
}
#endif
