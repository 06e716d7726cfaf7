// A small fixed thread pool for the CPU conv kernels: hardware_concurrency() threads in all
// (the caller plus hardware_concurrency() - 1 workers). A job is a count of independent tasks;
// threads claim task indices from an atomic counter. The kernels give every task its own
// disjoint slice of the output, so which thread runs a task never changes any result; workers
// also take on the caller's floating-point environment (rounding, and on x86 the MXCSR
// flush-to-zero / denormals-are-zero bits XLA sets on its threads) for each job.
#pragma once

#include <algorithm>
#include <atomic>
#include <cfenv>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace jax_convnet::cpu {

class ThreadPool {
 public:
  // task(index, participant): participant in [0, participants()) names the thread running it,
  // so callers can hand each thread its own scratch buffers.
  using Task = std::function<void(int64_t, int)>;

  // The process-wide pool, started on first use and never destroyed (so that no thread is
  // joined during interpreter shutdown).
  static ThreadPool& shared() {
    static ThreadPool* pool =
        new ThreadPool(static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
    return *pool;
  }

  int participants() const { return static_cast<int>(threads_.size()) + 1; }

  // Runs task(i, participant) for every i in [0, n_tasks) and returns once all have finished.
  // Returns false if any task threw. If another caller is using the pool at the moment, the
  // tasks run on the calling thread alone (participant 0) instead of waiting.
  bool run(int64_t n_tasks, const Task& task) {
    if (n_tasks <= 0) return true;
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock() || threads_.empty() || n_tasks == 1) {
      Job job{&task, n_tasks};
      work(job, 0);
      return !job.failed.load();
    }
    auto job = std::make_shared<Job>(&task, n_tasks);
    std::fegetenv(&job->fp_env);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = job;
      ++generation_;
    }
    wake_.notify_all();
    work(*job, 0);
    {
      std::unique_lock<std::mutex> lock(mutex_);
      finished_.wait(lock, [&] { return job->done.load() == n_tasks; });
      job_.reset();
    }
    return !job->failed.load();
  }

 private:
  struct Job {
    Job(const Task* t, int64_t n) : task(t), n_tasks(n) {}
    const Task* task;  // valid until done == n_tasks; never touched after (next >= n_tasks)
    int64_t n_tasks;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::atomic<bool> failed{false};
    std::fenv_t fp_env;
  };

  explicit ThreadPool(int participants) {
    for (int i = 1; i < participants; ++i) threads_.emplace_back([this, i] { worker_loop(i); });
  }

  void worker_loop(int participant) {
    uint64_t seen = 0;
    for (;;) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        job = job_;
      }
      if (!job) continue;
      std::fesetenv(&job->fp_env);
      work(*job, participant);
    }
  }

  void work(Job& job, int participant) {
    for (;;) {
      int64_t i = job.next.fetch_add(1);
      if (i >= job.n_tasks) return;
      try {
        (*job.task)(i, participant);
      } catch (...) {
        job.failed.store(true);
      }
      if (job.done.fetch_add(1) + 1 == job.n_tasks) {
        std::lock_guard<std::mutex> lock(mutex_);
        finished_.notify_all();
      }
    }
  }

  std::vector<std::thread> threads_;
  std::mutex busy_;   // held by the one caller whose job the workers serve
  std::mutex mutex_;  // guards job_ and generation_
  std::condition_variable wake_, finished_;
  std::shared_ptr<Job> job_;
  uint64_t generation_ = 0;
};

}  // namespace jax_convnet::cpu
