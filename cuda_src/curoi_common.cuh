// curoi common header: lets one kernel source compile for the GPU (NVRTC) and
// for the CPU (the host C++ compiler, with OpenMP).
//
// Kernels written against this header use only what it can map to both:
// grid-stride loops (CUDA_1D_KERNEL_LOOP), atomic adds and plain arithmetic.
// No shared memory, warp intrinsics or __syncthreads: the CPU build has no
// thread blocks to give them a meaning.
#ifndef CUROI_COMMON_CUH
#define CUROI_COMMON_CUH

#if defined(__CUDACC_RTC__) || defined(__CUDACC__)
// ---------------------------------------------------------------- GPU build
#define CUROI_GPU 1

typedef long long int64_t;
typedef unsigned long long uint64_t;

#if defined(CUROI_WITH_F16)
#include <cuda_fp16.h>
#endif
#if defined(CUROI_WITH_BF16)
#include <cuda_bf16.h>
#endif

#define CUROI_KERNEL extern "C" __global__
#define CUROI_DEVICE __device__ __forceinline__

// One iteration per element; the index and the stride are 64-bit so that
// tensors of more than 2^31 elements are covered.
#define CUDA_1D_KERNEL_LOOP(i, n)                                            \
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;           \
       i < (int64_t)(n); i += (int64_t)blockDim.x * gridDim.x)

template <typename T>
CUROI_DEVICE void curoi_atomic_add(T* address, T value) {
  atomicAdd(address, value);
}

#else
// ---------------------------------------------------------------- CPU build
#include <stdint.h>
#include <math.h>

#if defined(_WIN32)
#define CUROI_KERNEL extern "C" __declspec(dllexport)
#else
#define CUROI_KERNEL extern "C" __attribute__((visibility("default")))
#endif
#define CUROI_DEVICE static inline

// The grid-stride loop becomes an OpenMP loop over all elements. Dynamic
// scheduling in chunks: boxes differ in size, so elements differ in cost.
#define CUDA_1D_KERNEL_LOOP(i, n)                                            \
  _Pragma("omp parallel for schedule(dynamic, 64)")                          \
  for (int64_t i = 0; i < (int64_t)(n); ++i)

template <typename T>
static inline void curoi_atomic_add(T* address, T value) {
#pragma omp atomic
  *address += value;
}

#endif

// ------------------------------------------------------------- element types
// Half-precision storage computes in float; float and double in themselves.
template <typename T> struct AccType { typedef T type; };
#if defined(CUROI_WITH_F16)
template <> struct AccType<__half> { typedef float type; };
#endif
#if defined(CUROI_WITH_BF16)
template <> struct AccType<__nv_bfloat16> { typedef float type; };
#endif

template <typename A, typename T> CUROI_DEVICE A curoi_load(const T& v) {
  return static_cast<A>(v);
}
template <typename T, typename A> CUROI_DEVICE T curoi_store(A v) {
  return static_cast<T>(v);
}
#if defined(CUROI_WITH_F16)
template <> CUROI_DEVICE float curoi_load<float, __half>(const __half& v) {
  return __half2float(v);
}
template <> CUROI_DEVICE __half curoi_store<__half, float>(float v) {
  return __float2half_rn(v);
}
#endif
#if defined(CUROI_WITH_BF16)
template <> CUROI_DEVICE float curoi_load<float, __nv_bfloat16>(
    const __nv_bfloat16& v) {
  return __bfloat162float(v);
}
template <> CUROI_DEVICE __nv_bfloat16 curoi_store<__nv_bfloat16, float>(
    float v) {
  return __float2bfloat16_rn(v);
}
#endif

template <typename A> CUROI_DEVICE bool curoi_isfinite(A v) {
  // v - v is NaN for NaN and +-inf, 0 otherwise; unaffected by fast-math
  // assumptions about isfinite on either compiler.
  return (v - v) == (v - v);
}

template <typename A> CUROI_DEVICE A curoi_min(A a, A b) { return b < a ? b : a; }
template <typename A> CUROI_DEVICE A curoi_max(A a, A b) { return a < b ? b : a; }

// Clamp a real number into [lo, hi] and convert it to an integer. Converting
// a float outside the integer range is undefined behaviour, so every
// coordinate derived from a box goes through here.
template <typename A> CUROI_DEVICE int64_t curoi_clamp_to_int(A v, A lo, A hi) {
  if (!(v >= lo)) return (int64_t)lo;  // also NaN
  if (v > hi) return (int64_t)hi;
  return (int64_t)v;
}

// A box row is (batch index, x1, y1, x2, y2). Its batch index is usable only
// when it is finite and lies in [0, batch); otherwise the box reads nothing and
// writes no gradient. Returns -1 for an unusable box.
template <typename A>
CUROI_DEVICE int64_t curoi_box_batch(const A* box, int64_t batch) {
  const A b = box[0];
  if (!(b >= (A)0) || !(b < (A)batch)) return -1;  // NaN fails both
  for (int j = 1; j < 5; ++j)
    if (!curoi_isfinite(box[j])) return -1;
  return (int64_t)b;
}

// ------------------------------------------------- instantiation by element type
// The GPU backend compiles one element type per module (so that float32 and
// float64 need no CUDA headers at all); the CPU backend compiles float32 and
// float64. CUROI_INSTANTIATE(M) expands M(T, suffix) once per enabled type.
#if defined(CUROI_WITH_F32)
#define CUROI_IF_F32(M) M(float, f32)
#else
#define CUROI_IF_F32(M)
#endif
#if defined(CUROI_WITH_F64)
#define CUROI_IF_F64(M) M(double, f64)
#else
#define CUROI_IF_F64(M)
#endif
#if defined(CUROI_WITH_F16)
#define CUROI_IF_F16(M) M(__half, f16)
#else
#define CUROI_IF_F16(M)
#endif
#if defined(CUROI_WITH_BF16)
#define CUROI_IF_BF16(M) M(__nv_bfloat16, bf16)
#else
#define CUROI_IF_BF16(M)
#endif
#define CUROI_INSTANTIATE(M) \
  CUROI_IF_F32(M) CUROI_IF_F64(M) CUROI_IF_F16(M) CUROI_IF_BF16(M)

#endif  // CUROI_COMMON_CUH
