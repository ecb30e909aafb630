// curoi common header: lets one kernel source compile for the GPU (NVRTC) and
// for the CPU (the host C++ compiler, with a thread pool of its own).
//
// What is shared is the formulas (geometry, sample taps, weights,
// conventions): device functions written once, that every backend calls.
// The loops that drive them differ by backend:
//
// - GPU loops (CUROI_GPU_LOOPS, always on in the GPU build): one thread per
//   output element, or per bin of a box and a tile of its channels
//   (curoi_channel_tile) where the bin's geometry is shared by the channels,
//   CUDA_1D_KERNEL_LOOP grid-stride loops, atomic adds into gradients
//   (curoi_scatter_add).
// - CPU loops: work items handed to the pool (curoi_parallel_for,
//   curoi_parallel_shares), with per-box tables shared by all channels and
//   gradient planes owned by one thread each, so no atomics.
//
// The CPU build can also be compiled with the GPU loops (-DCUROI_GPU_LOOPS,
// run serially), so that the GPU's loop code runs in CI on a machine
// without a GPU.
//
// No shared memory or __syncthreads: the CPU build has no thread blocks to
// give them a meaning. The one warp-wide operation, curoi_warp_max, is
// defined for both: a CPU "thread" is a warp of one.
#ifndef CUROI_COMMON_CUH
#define CUROI_COMMON_CUH

#if defined(__CUDACC_RTC__) || defined(__CUDACC__)
// ---------------------------------------------------------------- GPU build
#define CUROI_GPU 1
#define CUROI_GPU_LOOPS 1

typedef long long int64_t;
typedef unsigned long long uint64_t;
typedef int int32_t;
typedef unsigned int uint32_t;

#if defined(CUROI_WITH_F16)
#include <cuda_fp16.h>
#endif
#if defined(CUROI_WITH_BF16)
#include <cuda_bf16.h>
#endif

#define CUROI_KERNEL extern "C" __global__
#define CUROI_DEVICE __device__ __forceinline__
// A member function of a struct that device code calls.
#define CUROI_MEMBER __device__ __forceinline__
// A kernel argument passed by value whose members are read through pointers
// where it lies (sm_70 and newer), rather than through a copy in local
// memory.
#define CUROI_GRID_CONSTANT __grid_constant__

// One iteration per element; the index and the stride are 64-bit so that
// tensors of more than 2^31 elements are covered.
#define CUDA_1D_KERNEL_LOOP(i, n)                                            \
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;           \
       i < (int64_t)(n); i += (int64_t)blockDim.x * gridDim.x)

template <typename T>
CUROI_DEVICE void curoi_scatter_add(T* address, T value) {
  atomicAdd(address, value);
}

// Integer addition wraps modulo 2^64 in unsigned arithmetic, so the order of
// the adds cannot change the result.
CUROI_DEVICE void curoi_scatter_add_int64(int64_t* address, int64_t value) {
  atomicAdd((unsigned long long*)address, (unsigned long long)value);
}

CUROI_DEVICE int64_t curoi_round_to_int64(double v) { return __double2ll_rn(v); }

// A maximum over the 32 threads of a warp, and whether this thread is the
// one that then writes it. Every thread of the warp must call
// curoi_warp_max, after its grid-stride loop.
CUROI_DEVICE double curoi_warp_max(double v) {
  for (int offset = 16; offset > 0; offset >>= 1)
    v = fmax(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}
CUROI_DEVICE bool curoi_warp_leader() { return (threadIdx.x & 31) == 0; }

// *address = max(*address, v) for non-negative doubles, whose bit patterns
// order as their values do.
CUROI_DEVICE void curoi_atomic_max_nonnegative(double* address, double v) {
  atomicMax((unsigned long long*)address,
            (unsigned long long)__double_as_longlong(v));
}

#else
// ---------------------------------------------------------------- CPU build
#include <stdint.h>
#include <math.h>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <new>
#if !defined(_WIN32)
#include <pthread.h>
#endif
#include <thread>

#if defined(_WIN32)
#define CUROI_KERNEL extern "C" __declspec(dllexport)
#else
#define CUROI_KERNEL extern "C" __attribute__((visibility("default")))
#endif
#define CUROI_DEVICE static inline
#define CUROI_MEMBER inline
#define CUROI_GRID_CONSTANT

// Threads for the kernels' loops, set from Python (curoi.set_num_threads)
// through ctypes. One variable for the whole library, whichever source file
// includes this header.
extern "C" {
// "used": emitted even where nothing reads it.
__attribute__((visibility("default"), used)) inline int curoi_num_threads = 1;
}

static inline int curoi_threads() {
  return curoi_num_threads > 1 ? curoi_num_threads : 1;
}

// ------------------------------------------------------------ thread pool
// curoi's own pool of worker threads rather than OpenMP's: an OpenMP
// runtime's pool does not survive fork(), and the first parallel loop in a
// forked child (a DataLoader worker, a multiprocessing pool) waits forever
// for threads that do not exist there. This pool is replaced in the child
// by a fork handler and starts new workers on the child's first parallel
// call. It also keeps curoi's thread count to exactly curoi_num_threads,
// beside whatever runtime other libraries in the process (PyTorch) use.
//
// A job runs a function on `participants` threads: the calling thread is
// participant 0 and workers 1 .. participants-1 join it. One job at a time:
// a second Python thread calling a kernel meanwhile waits for the pool, so
// the process never runs more than curoi_num_threads kernel threads.
struct CuroiJob {
  void (*run)(void* context, int participant, int participants);
  void* context;
  int participants;
};

struct CuroiPool {
  std::mutex call;                   // held by the thread running a job
  std::mutex state;                  // guards everything below
  std::condition_variable wake;      // workers wait here for a new job
  std::condition_variable finished;  // the caller waits here for the workers
  CuroiJob job;
  unsigned long long generation = 0;  // number of jobs published
  int workers = 0;                    // started; they live as long as the pool
  int busy = 0;                       // workers still running the current job
};

// Never destroyed: worker threads block in it until the process exits.
inline CuroiPool* curoi_pool = new CuroiPool();

struct CuroiWorkerStart {
  CuroiPool* pool;
  int index;
  unsigned long long generation;
};

inline void curoi_worker_loop(CuroiWorkerStart start) {
#if defined(__linux__)
  // Shown by ps, top and /proc/<pid>/task/*/comm.
  pthread_setname_np(pthread_self(), "curoi-worker");
#endif
  CuroiPool* pool = start.pool;
  unsigned long long seen = start.generation;
  for (;;) {
    CuroiJob job;
    {
      std::unique_lock<std::mutex> lock(pool->state);
      pool->wake.wait(lock, [&] { return pool->generation != seen; });
      seen = pool->generation;
      job = pool->job;
    }
    if (start.index < job.participants) {
      job.run(job.context, start.index, job.participants);
      std::lock_guard<std::mutex> lock(pool->state);
      if (--pool->busy == 0) pool->finished.notify_one();
    }
  }
}

// Run `run(context, p, participants)` for p in [0, participants), p = 0 on
// the calling thread. Fewer participants if the system refuses threads.
inline void curoi_pool_run(void (*run)(void*, int, int), void* context,
                           int participants) {
  if (participants <= 1) {
    run(context, 0, 1);
    return;
  }
  CuroiPool* pool = curoi_pool;
  std::lock_guard<std::mutex> call(pool->call);
  {
    std::lock_guard<std::mutex> lock(pool->state);
    while (pool->workers < participants - 1) {
      try {
        std::thread(curoi_worker_loop,
                    CuroiWorkerStart{pool, pool->workers + 1, pool->generation})
            .detach();
      } catch (...) {
        break;  // out of threads: run with those there are
      }
      ++pool->workers;
    }
    if (participants > pool->workers + 1) participants = pool->workers + 1;
    pool->job = CuroiJob{run, context, participants};
    pool->busy = participants - 1;
    ++pool->generation;
  }
  pool->wake.notify_all();
  run(context, 0, participants);
  std::unique_lock<std::mutex> lock(pool->state);
  pool->finished.wait(lock, [&] { return pool->busy == 0; });
}

#if !defined(_WIN32)
// In a forked child only the forking thread exists: the workers are gone and
// the pool's locks may be held by threads that no longer run. Start over with
// a new pool; the old one is left alone (destroying it would touch what those
// threads owned). Runs before any code of the child, so nothing races it.
inline void curoi_pool_after_fork_in_child() {
  CuroiPool* fresh = new (std::nothrow) CuroiPool();
  if (fresh != nullptr) curoi_pool = fresh;
}
inline const int curoi_fork_handler =
    pthread_atfork(nullptr, nullptr, curoi_pool_after_fork_in_child);
#endif

// Work below this many loop iterations times their estimated cost runs on
// the calling thread: waking workers costs more than it saves.
#define CUROI_SERIAL_WORK 4096

// f(i) for i in [0, n), in chunks of `chunk` handed out dynamically (boxes
// differ in size, so iterations differ in cost). `cost` estimates the work of
// one iteration, to keep small calls serial.
template <typename F>
inline void curoi_parallel_for(int64_t n, int64_t chunk, int64_t cost,
                               const F& f) {
  if (n <= 0) return;
  if (chunk < 1) chunk = 1;
  int64_t threads = curoi_threads();
  const int64_t chunks = (n + chunk - 1) / chunk;
  if (threads > chunks) threads = chunks;
  const int64_t each = cost > 1 ? cost : 1;  // n * each could overflow
  if (threads <= 1 || n < (CUROI_SERIAL_WORK + each - 1) / each) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
  struct Loop {
    const F* f;
    int64_t n, chunk;
    std::atomic<int64_t> next;
  } loop{&f, n, chunk, {0}};
  curoi_pool_run(
      [](void* context, int, int) {
        Loop& l = *static_cast<Loop*>(context);
        for (;;) {
          const int64_t begin = l.next.fetch_add(l.chunk);
          if (begin >= l.n) return;
          const int64_t end = begin + l.chunk < l.n ? begin + l.chunk : l.n;
          for (int64_t i = begin; i < end; ++i) (*l.f)(i);
        }
      },
      &loop, (int)threads);
}

// f(participant, participants) once on each of up to `limit` threads (for a
// fixed share of the work per thread); `work` as n * cost above.
template <typename F>
inline void curoi_parallel_shares(int64_t limit, int64_t work, const F& f) {
  int64_t threads = curoi_threads();
  if (threads > limit) threads = limit;
  if (threads <= 1 || work < CUROI_SERIAL_WORK) {
    f(0, 1);
    return;
  }
  curoi_pool_run(
      [](void* context, int participant, int participants) {
        (*static_cast<const F*>(context))(participant, participants);
      },
      const_cast<F*>(&f), (int)threads);
}

// A function kept out of line (a hot loop with few pointers, which the
// optimiser would otherwise fold into a caller with too many live values),
// and a hint that memory at p is read soon.
#if defined(_MSC_VER) && !defined(__clang__)
#define CUROI_NOINLINE __declspec(noinline)
static inline void curoi_prefetch(const void*) {}
#else
#define CUROI_NOINLINE __attribute__((noinline))
static inline void curoi_prefetch(const void* p) { __builtin_prefetch(p); }
#endif

// With the GPU's loops on the CPU (tests), the grid-stride loop runs
// serially: one "thread" visits every element.
#define CUDA_1D_KERNEL_LOOP(i, n) for (int64_t i = 0; i < (int64_t)(n); ++i)

// Work items of the CPU loops: groups of up to CUROI_BOX_GROUP consecutive
// boxes times blocks of channels. Within an item each channel plane is read
// (or, backward, written) by all the group's boxes in turn, while it is in
// the cache, and the group's per-box tables are built once. Boxes alone give
// every thread work when there are many; a few boxes with many channels
// are split into channel blocks.
#define CUROI_BOX_GROUP 16

struct CuroiItems {
  int64_t boxes, channels;
  int64_t groups, blocks, block;
  int64_t count() const { return groups * blocks; }
  int64_t first_box(int64_t item) const { return item / blocks * CUROI_BOX_GROUP; }
  int64_t end_box(int64_t item) const {
    const int64_t end = first_box(item) + CUROI_BOX_GROUP;
    return end < boxes ? end : boxes;
  }
  int64_t first_channel(int64_t item) const { return item % blocks * block; }
  int64_t end_channel(int64_t item) const {
    const int64_t end = first_channel(item) + block;
    return end < channels ? end : channels;
  }
};

static inline CuroiItems curoi_items(int64_t boxes, int64_t channels) {
  CuroiItems items;
  items.boxes = boxes;
  items.channels = channels;
  items.groups = (boxes + CUROI_BOX_GROUP - 1) / CUROI_BOX_GROUP;
  const int64_t wanted = 8 * (int64_t)curoi_threads();
  int64_t blocks = 1;
  if (items.groups > 0 && items.groups < wanted && channels > 1) {
    blocks = (wanted + items.groups - 1) / items.groups;
    if (blocks > channels) blocks = channels;
  }
  items.block = channels > 0 ? (channels + blocks - 1) / blocks : 1;
  items.blocks = channels > 0 ? (channels + items.block - 1) / items.block : 0;
  return items;
}

// The channels [begin, end) that participant p of n owns.
struct CuroiChannelRange {
  int64_t begin, end;
};

static inline CuroiChannelRange curoi_owned_channels(int64_t channels, int p,
                                                     int n) {
  CuroiChannelRange range;
  range.begin = channels * p / n;
  range.end = channels * (p + 1) / n;
  return range;
}

template <typename T>
static inline void curoi_scatter_add(T* address, T value) {
  *address += value;
}

static inline void curoi_scatter_add_int64(int64_t* address, int64_t value) {
  // Unsigned: wrapping is defined (and, with the scale chosen below, never
  // happens).
  *(uint64_t*)address += (uint64_t)value;
}

static inline int64_t curoi_round_to_int64(double v) { return llrint(v); }

// The GPU's warp-wide maximum, for a CPU "thread" (a loop iteration of the
// GPU's loops, or a participant of the CPU's), which is a warp of its own.
static inline double curoi_warp_max(double v) { return v; }
static inline bool curoi_warp_leader() { return true; }

// *address = max(*address, v) for non-negative doubles, atomically: the
// CPU loops' participants fold their maxima into one result.
static inline void curoi_atomic_max_nonnegative(double* address, double v) {
  static std::mutex guard;  // a few participants, once each per launch
  std::lock_guard<std::mutex> lock(guard);
  if (*address < v) *address = v;
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

// The position (k, c, ph, pw) of output element `index` in [K, C, PH, PW],
// for the GPU's thread-per-element loop. Three divisions, in 32 bits
// whenever the whole output has fewer than 2^32 elements: GPUs have no
// 64-bit integer division and emulate it in software.
struct CuroiOutputIndex {
  int64_t k, c, ph, pw;
};

// The digits of `index` in the mixed radix (r0, r1, r2, rest), innermost
// first: d[0] = index % r0, d[1] = index / r0 % r1, and so on. Three
// divisions, in 32 bits whenever the whole range `total` fits (GPUs have no
// 64-bit integer division and emulate it in software).
CUROI_DEVICE void curoi_unflatten(int64_t index, int64_t total, int64_t r0,
                                  int64_t r1, int64_t r2, int64_t* d) {
  if (total <= (int64_t)0xffffffff) {
    const uint32_t i = (uint32_t)index, a = (uint32_t)r0, b = (uint32_t)r1,
                   c = (uint32_t)r2;
    const uint32_t q0 = i / a, q1 = q0 / b, q2 = q1 / c;
    d[0] = i - q0 * a;
    d[1] = q0 - q1 * b;
    d[2] = q1 - q2 * c;
    d[3] = q2;
  } else {
    const int64_t q0 = index / r0, q1 = q0 / r1, q2 = q1 / r2;
    d[0] = index - q0 * r0;
    d[1] = q0 - q1 * r1;
    d[2] = q1 - q2 * r2;
    d[3] = q2;
  }
}

CUROI_DEVICE CuroiOutputIndex curoi_output_index(int64_t index, int64_t total,
                                                 int64_t channels,
                                                 int64_t pooled_height,
                                                 int64_t pooled_width) {
  int64_t d[4];
  curoi_unflatten(index, total, pooled_width, pooled_height, channels, d);
  CuroiOutputIndex at;
  at.pw = d[0];
  at.ph = d[1];
  at.c = d[2];
  at.k = d[3];
  return at;
}

// The position (k, ph, pw, c) of output element `index` in channels-last
// [K, PH, PW, C]: the channel moves fastest, so adjacent threads read
// adjacent channels of one pixel (coalesced).
CUROI_DEVICE CuroiOutputIndex curoi_output_index_nhwc(int64_t index,
                                                      int64_t total,
                                                      int64_t channels,
                                                      int64_t pooled_height,
                                                      int64_t pooled_width) {
  int64_t d[4];
  curoi_unflatten(index, total, channels, pooled_width, pooled_height, d);
  CuroiOutputIndex at;
  at.c = d[0];
  at.pw = d[1];
  at.ph = d[2];
  at.k = d[3];
  return at;
}

// Where the GPU loops find channel c of image b: pixel (h, w) lies at
// at + (h * width + w) * step, in [N, C, H, W] (step 1) or channels-last
// [N, H, W, C] (step C). A template argument, so that the NCHW loops compile
// to what they were without the layout.
struct CuroiPlane {
  int64_t at, step;
};

template <bool ChannelsLast>
CUROI_DEVICE CuroiPlane curoi_plane(int64_t b, int64_t c, int64_t channels,
                                    int64_t plane_size) {
  CuroiPlane plane;
  if (ChannelsLast) {
    plane.at = b * plane_size * channels + c;
    plane.step = channels;
  } else {
    plane.at = (b * channels + c) * plane_size;
    plane.step = 1;
  }
  return plane;
}

template <bool ChannelsLast>
CUROI_DEVICE CuroiOutputIndex curoi_output_at(int64_t index, int64_t total,
                                              int64_t channels,
                                              int64_t pooled_height,
                                              int64_t pooled_width) {
  return ChannelsLast ? curoi_output_index_nhwc(index, total, channels,
                                                pooled_height, pooled_width)
                      : curoi_output_index(index, total, channels,
                                           pooled_height, pooled_width);
}

// ------------------------------------------- a GPU thread's tile of channels
// What does not depend on the channel (a box's row, its bin's samples, taps
// and weights) is computed once per (box, bin) and reused across a tile of
// channels: a thread of the GPU loops owns one bin of one box and `count`
// of its channels, first, first + step, ... The launch has
// boxes * PH * PW * groups threads, groups = ceil(C / tile) chosen by the
// caller (curoi/_ops.py, channel_groups) so that small calls still fill the
// GPU. Adjacent threads stay coalesced in both layouts:
// - NCHW: adjacent threads take adjacent bins of a box (the digits are pw,
//   ph, group, box, innermost first) and a thread's channels are contiguous
//   (step 1): for each channel, a warp writes adjacent output elements;
// - NHWC: adjacent threads take adjacent groups of one bin (group, pw, ph,
//   box) and a thread's channels are `groups` apart: for each of them, a
//   warp reads and writes adjacent channels of one pixel.
struct CuroiChannelTile {
  int64_t k, ph, pw;
  int64_t first, step, count;
};

template <bool ChannelsLast>
CUROI_DEVICE CuroiChannelTile curoi_channel_tile(int64_t index, int64_t total,
                                                 int64_t channels,
                                                 int64_t groups,
                                                 int64_t pooled_height,
                                                 int64_t pooled_width) {
  int64_t d[4];
  CuroiChannelTile t;
  const int64_t tile = (channels + groups - 1) / groups;
  if (ChannelsLast) {
    curoi_unflatten(index, total, groups, pooled_width, pooled_height, d);
    const int64_t g = d[0];
    t.pw = d[1];
    t.ph = d[2];
    t.k = d[3];
    t.first = g;
    t.step = groups;
    t.count = g < channels ? (channels - g + groups - 1) / groups : 0;
  } else {
    curoi_unflatten(index, total, pooled_width, pooled_height, groups, d);
    t.pw = d[0];
    t.ph = d[1];
    const int64_t g = d[2];
    t.k = d[3];
    t.first = g * tile;
    t.step = 1;
    const int64_t left = channels - t.first;
    t.count = left < 0 ? 0 : (left < tile ? left : tile);
  }
  return t;
}

// Which input channel an output channel reads, in the tiled loops: a
// channel map M, with
//   roi_output_channels(m, channels): output channels for `channels` input
//     channels;
//   roi_input_channel(m, c, bin): the input channel that output channel c
//     reads in bin ph * PW + pw;
//   roi_channel_step(m): how many input channels apart output channels c and
//     c + 1 read, in the same bin.
// The plain map, CuroiSameChannel, folds to constants; position-sensitive
// pooling has its own (ps_roi.cuh).
struct CuroiSameChannel {};

CUROI_DEVICE int64_t roi_output_channels(const CuroiSameChannel&,
                                         int64_t channels) {
  return channels;
}
CUROI_DEVICE int64_t roi_input_channel(const CuroiSameChannel&, int64_t c,
                                       int64_t) {
  return c;
}
CUROI_DEVICE int64_t roi_channel_step(const CuroiSameChannel&) {
  return 1;
}

// Where a tile's channels lie: channel i of the tile (0 <= i < count) writes
// output[out + i * out_step] and reads its bin's plane at input + in +
// i * in_step, pixel (y, x) at (y * W + x) * pixel_step from there.
struct CuroiTileAt {
  int64_t out, out_step, in, in_step, pixel_step, count;
};

// Output channel c of box k, bin (ph, pw): NCHW ((k * C_out + c) * PH + ph)
// * PW + pw, NHWC ((k * PH + ph) * PW + pw) * C_out + c; it reads input
// channel roi_input_channel(c, bin) of image b (curoi_plane), which moves
// by roi_channel_step(map) input channels from c to c + 1.
template <bool ChannelsLast, typename Map>
CUROI_DEVICE CuroiTileAt curoi_tile_at(const Map& map,
                                       const CuroiChannelTile& t, int64_t b,
                                       int64_t channels, int64_t plane_size,
                                       int64_t pooled_height,
                                       int64_t pooled_width) {
  const int64_t out_channels = roi_output_channels(map, channels);
  const int64_t bins = pooled_height * pooled_width;
  const int64_t bin = t.ph * pooled_width + t.pw;
  const int64_t step = t.step * roi_channel_step(map);
  CuroiTileAt at;
  at.count = t.count;
  at.out = ChannelsLast ? (t.k * bins + bin) * out_channels + t.first
                        : (t.k * out_channels + t.first) * bins + bin;
  at.out_step = ChannelsLast ? t.step : t.step * bins;
  at.in = b < 0 ? 0
                : curoi_plane<ChannelsLast>(b, roi_input_channel(map, t.first,
                                                                 bin),
                                            channels, plane_size)
                      .at;
  at.in_step = ChannelsLast ? step : step * plane_size;
  at.pixel_step = ChannelsLast ? channels : 1;
  return at;
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

// ------------------------------------------------ where a backward pass sums
// Both sums add through curoi_scatter_add: atomic with the GPU's loops, a
// plain add with the CPU's, where each gradient plane has one owner.
//
// The plain sum: floating-point adds. On the GPU they are atomic, in an
// order that varies from run to run, so the last bits of a result may vary
// too; on the CPU the order is fixed (each plane is summed by the thread
// that owns its channel, box after box, bin after bin).
template <typename A>
struct CuroiFloatSum {
  A* grad;
};

template <typename A>
CUROI_DEVICE void curoi_sum_add(const CuroiFloatSum<A>& sum, int64_t at, A v) {
  curoi_scatter_add(sum.grad + at, v);
}

// The sum seen from element `at` on: adds at i land at at + i.
template <typename A>
CUROI_DEVICE CuroiFloatSum<A> curoi_sum_offset(const CuroiFloatSum<A>& sum,
                                               int64_t at) {
  CuroiFloatSum<A> moved;
  moved.grad = sum.grad + at;
  return moved;
}

// The deterministic sum: every finite term is rounded to a multiple of 2^-e
// and added as a 64-bit integer, which is exact and so independent of order.
// e is chosen from a bound on every sum, max|term source| * terms, such that
// bound * 2^e <= 2^61: a sum of rounded terms then stays below 2^62 in
// magnitude and cannot overflow. Non-finite terms (from inf or NaN gradients)
// go to the float buffer, where their result (inf or NaN) does not depend on
// order either; curoi_fixed_finish adds the two.
template <typename A>
struct CuroiFixedSum {
  A* grad;
  int64_t* fixed;
  double scale;  // 2^e
};

CUROI_DEVICE int curoi_fixed_exponent(double max_abs, int64_t terms) {
  int e_max = 0, e_terms = 0;
  frexp(max_abs, &e_max);           // max_abs < 2^e_max
  frexp((double)terms, &e_terms);   // terms < 2^e_terms
  const int e = 61 - e_max - e_terms;
  // 2^1000 keeps the scale finite; it only limits gradients below ~1e-280.
  return e < 1000 ? e : 1000;
}

template <typename A>
CUROI_DEVICE CuroiFixedSum<A> curoi_fixed_sum(A* grad, int64_t* fixed,
                                              const double* max_abs,
                                              int64_t terms) {
  CuroiFixedSum<A> sum;
  sum.grad = grad;
  sum.fixed = fixed;
  sum.scale = ldexp(1.0, curoi_fixed_exponent(*max_abs, terms));
  return sum;
}

template <typename A>
CUROI_DEVICE void curoi_sum_add(const CuroiFixedSum<A>& sum, int64_t at, A v) {
  if (curoi_isfinite(v)) {
    curoi_scatter_add_int64(sum.fixed + at,
                            curoi_round_to_int64((double)v * sum.scale));
  } else {
    curoi_scatter_add(sum.grad + at, v);
  }
}

template <typename A>
CUROI_DEVICE CuroiFixedSum<A> curoi_sum_offset(const CuroiFixedSum<A>& sum,
                                               int64_t at) {
  CuroiFixedSum<A> moved = sum;
  moved.grad = sum.grad + at;
  moved.fixed = sum.fixed + at;
  return moved;
}

// grad[i] += fixed[i] * 2^-e, once every term has been added.
template <typename A>
CUROI_DEVICE void curoi_fixed_finish(const int64_t* fixed,
                                     const double* max_abs, int64_t terms,
                                     int64_t total, A* grad) {
  const int e = curoi_fixed_exponent(*max_abs, terms);
  // Multiplying by a power of two rounds as ldexp does; 2^-e is a double
  // unless e < -1023, which takes max|term| near the top of double's range.
  const bool multiply = e >= -1000;
  const double unit = multiply ? ldexp(1.0, -e) : 0.0;
  CUDA_1D_KERNEL_LOOP(i, total) {
    const double value = multiply ? (double)fixed[i] * unit
                                  : ldexp((double)fixed[i], -e);
    grad[i] = grad[i] + (A)value;
  }
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


// The gradient of each box from its bins' partial sums partial[K, bins,
// Columns], added bin after bin (a fixed order, so no atomics and the same
// bits on every launch): grad[k * stride + first + j] for j < Columns, and 0
// in the columns before first (a batch index). first is 0 or 1.
template <int Columns, typename A>
CUROI_DEVICE void curoi_boxes_finish_columns(const A* partial,
                                             int64_t num_boxes, int64_t bins,
                                             int64_t stride, int64_t first,
                                             A* grad) {
  CUDA_1D_KERNEL_LOOP(i, num_boxes * Columns) {
    const int64_t k = i / Columns, j = i - k * Columns;
    const A* p = partial + k * bins * Columns + j;
    A sum = (A)0;
    for (int64_t bin = 0; bin < bins; ++bin) sum += p[bin * Columns];
    grad[k * stride + first + j] = sum;
    if (j < first) grad[k * stride + j] = (A)0;
  }
}

// Four columns: the corners of an axis-aligned box.
template <typename A>
CUROI_DEVICE void curoi_boxes_finish(const A* partial, int64_t num_boxes,
                                     int64_t bins, int64_t stride,
                                     int64_t first, A* grad) {
  curoi_boxes_finish_columns<4>(partial, num_boxes, bins, stride, first, grad);
}

#endif  // CUROI_COMMON_CUH
