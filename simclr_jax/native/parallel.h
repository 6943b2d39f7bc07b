// Work split over XLA's own CPU threads, for the FFI kernels in this directory.
//
// Kernels run their parts on the thread XLA called them on and on XLA's intra-op pool (the FFI's
// ThreadPool context) instead of starting threads of their own: other thread teams would fight
// XLA's and tf.data's threads for the cores, and a team waits at every barrier for its slowest
// thread (experiments/results/train_step.md measured what that did to oneDNN's OpenMP teams).

#ifndef SIMCLR_JAX_NATIVE_PARALLEL_H_
#define SIMCLR_JAX_NATIVE_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace simclr_native {

// Calls part(i) for every i in [0, parts) on the calling thread and the pool's threads, and
// returns the message of the first exception a part threw ("" if none). The calling thread takes
// parts too and then waits only for parts other threads are running, so it finishes even when
// every pool thread is busy elsewhere (another device's computation, say).
template <typename Part>
std::string RunParts(xla::ffi::ThreadPool& pool, int64_t parts, const Part& part) {
  struct Shared {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mutex;
    std::condition_variable all_done;
    std::string error;
  };
  if (parts <= 0) return "";
  auto shared = std::make_shared<Shared>();
  // A task that starts after the last part was claimed touches nothing but `shared`: `part`
  // may be gone by then.
  auto work = [shared, parts, &part] {
    for (int64_t i; (i = shared->next.fetch_add(1)) < parts;) {
      try {
        part(i);
      } catch (const std::exception& e) {
        std::lock_guard<std::mutex> lock(shared->mutex);
        if (shared->error.empty()) shared->error = e.what();
      }
      if (shared->done.fetch_add(1) + 1 == parts) {
        std::lock_guard<std::mutex> lock(shared->mutex);
        shared->all_done.notify_all();
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(parts, pool.num_threads()) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work] { work(); });
  work();
  std::unique_lock<std::mutex> lock(shared->mutex);
  shared->all_done.wait(lock, [&] { return shared->done.load() == parts; });
  return shared->error;
}

}  // namespace simclr_native

#endif  // SIMCLR_JAX_NATIVE_PARALLEL_H_
