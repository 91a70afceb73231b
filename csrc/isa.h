// The name of the inline namespace that holds a header's functions: the CPU capability being
// compiled (cpu/kernels_impl.cpp is compiled once per capability), else "portable". Each object then
// gets its own copy of every inline function, so the linker cannot hand the default path an AVX-512
// copy (see stats.h).
#pragma once

#ifdef CPU_CAPABILITY
#define GRADWATCH_ISA CPU_CAPABILITY
#else
#define GRADWATCH_ISA portable
#endif
