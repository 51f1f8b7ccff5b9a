// FASTGPT_HD marks the arithmetic that the CUDA kernels and the CPU builds share: host and
// device functions under nvcc, plain inline functions for the C++ compiler.
#pragma once

#if defined(__CUDACC__)
#define FASTGPT_HD __host__ __device__ __forceinline__
#else
#define FASTGPT_HD inline
#endif
