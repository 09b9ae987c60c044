// Vector-ISA clones of the CPU loops (docs/kernels.md, "CPU loops").
//
// The extension is compiled for the baseline x86-64 (SSE2: 4 floats a vector), which every
// machine runs. FASTACD_CPU_CLONES on a loop function makes gcc compile it three times,
// for x86-64-v4 (AVX-512), x86-64-v3 (AVX2 + FMA) and the baseline, and pick the one the
// CPU supports when the library loads (an ifunc; gcc on Linux x86-64 only, elsewhere the
// baseline alone). The math stays the inline functions of kernels/cd_math.h, compiled
// into each clone.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FASTACD_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTACD_CPU_CLONES
#endif

// Keeps gcc from turning a short copy loop into a memmove / memset call (the windowed pass's
// rows are 12-20 values, where the call costs most of the row); other compilers: nothing.
#if defined(__GNUC__) && !defined(__clang__)
#define FASTACD_INLINE_COPIES __attribute__((optimize("no-tree-loop-distribute-patterns")))
#else
#define FASTACD_INLINE_COPIES
#endif
