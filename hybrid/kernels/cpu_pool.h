// The thread pool of cpu_kernel.cpp: a team of threads of its own, outside OpenMP and Python.
//
// Included once by cpu_kernel.cpp, after `Job`, `run_items`, `set_blocks`, `tiles_on` / `tiles_off`.
#pragma once

#include <atomic>
#include <chrono>
#include <climits>
#include <thread>
#include <vector>

namespace {

std::atomic<int> members_wanted{INT_MAX};     // members that take jobs (moe_pool_limit); the others sleep
std::atomic<int> join_above{0};               // `wait` works on jobs of more rows than this (moe_pool_join_above)
constexpr long STALL_NS = 1000000;            // a caller that does not join takes work after this long without progress

inline void relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
}

inline long now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
        std::chrono::steady_clock::now().time_since_epoch()).count();
}

// A team of threads of its own, outside OpenMP and Python: `start` hands it a job and returns at once, so the
// calling thread can go on queueing GPU work; `wait` makes the calling thread join the job until it is done, or,
// for a job of at most `join_above` rows (a GPU machine's decode, short, with the caller's host work to follow),
// only watch it finish.
// Work is taken in chunks from a counter per phase, and a phase starts once the previous one is complete, so a
// member may join at any time (the caller joins late, after its host work). Idle members spin for `spin_ns`
// after a job (the next layer's job comes within ~1 ms at decode), then sleep until woken. Members numbered
// `members_wanted` and up sit jobs out asleep: while other processes keep cores busy, a member that shares a core
// with one would hold every phase of every job up by a time slice.
class Pool {
  public:
    Pool(int n, long spin_ns) : n_(n), spin_ns_(spin_ns) {
        for (int i = 0; i < n; i++) std::thread([this, i] { loop(i); }).detach();   // never joined: lives as
    }                                                                              // long as the process
    int size() const { return n_; }

    void start(const Job &job) {
        gen_.fetch_add(1);                                    // odd: closed; members back out or finish
        while (active_.load() != 0) relax();                 // stragglers of the previous job leave
        job_ = job;
        set_blocks(job_, blocks_);
        t0_ = now_ns();
        park_.store(false, std::memory_order_relaxed);
        const int team = members() + 1;                      // the members that work, and the caller
        for (int p = 0; p < 4; p++) {
            long n = job_.size(p);
            grain_[p] = n / (4 * team) > 1 ? n / (4 * team) : 1;
            progress_[p].next.store(0, std::memory_order_relaxed);
            progress_[p].done.store(0, std::memory_order_relaxed);
            progress_[p].end.store(t0_, std::memory_order_relaxed);
        }
        gen_.fetch_add(1);                                    // even: open
#if defined(__cpp_lib_atomic_wait)
        gen_.notify_all();
#endif
    }

    void park() { park_.store(true, std::memory_order_relaxed); }   // idle members sleep now, not after spin_ns

    // -> ns from start to the job's last item done: the lane's own time, not when the caller came back to it (in
    // prefill the caller joins after milliseconds of launches, long after the members finished)
    long wait() {
        if (job_.rows > join_above.load(std::memory_order_relaxed)) work();
        else watch();
        long end = t0_;
        for (int p = 0; p < 4; p++) {
            const long e = progress_[p].end.load(std::memory_order_acquire);
            end = e > end ? e : end;
        }
        return end - t0_;
    }

  private:
    struct alignas(64) Progress {
        std::atomic<long> next{0};            // first item not yet taken
        std::atomic<long> done{0};            // items finished
        std::atomic<long> end{0};             // when the latest of them finished (now_ns)
        char pad[64 - 3 * sizeof(std::atomic<long>)];
    };

    void work() {
        tiles_on(job_);
        for (int p = 0; p < 4; p++) {
            const long n = job_.size(p), g = grain_[p];
            for (long lo; (lo = progress_[p].next.fetch_add(g, std::memory_order_relaxed)) < n;) {
                long hi = lo + g < n ? lo + g : n;
                run_items(job_, p, lo, hi);
                // the phase's latest finish, written before `done` counts the items (release): a waiter that
                // sees every item done sees every finish time too
                const long t = now_ns();
                long seen = progress_[p].end.load(std::memory_order_relaxed);
                while (seen < t && !progress_[p].end.compare_exchange_weak(seen, t, std::memory_order_relaxed)) {}
                progress_[p].done.fetch_add(hi - lo, std::memory_order_release);
            }
            while (progress_[p].done.load(std::memory_order_acquire) < n) relax();
        }
        tiles_off(job_);
    }

    // Wait for the members to finish without taking work, so the caller's caches keep its own data (joining, it
    // streams ~1/16 of the job's weights through them, and its next host steps start cold: the first Python call
    // after a job took 47 us instead of 14 on the development machine); if the job stops moving, join it.
    void watch() {
        long last = -1, since = 0;
        for (;;) {
            long finished = 0;
            bool complete = true;
            for (int p = 0; p < 4; p++) {
                const long d = progress_[p].done.load(std::memory_order_acquire);
                finished += d;
                complete = complete && d >= job_.size(p);
            }
            if (complete) return;
            const long t = now_ns();
            if (finished != last) last = finished, since = t;
            else if (t - since > STALL_NS) return work();
            for (int k = 0; k < 32; k++) relax();
        }
    }

    int members() const {
        int m = members_wanted.load(std::memory_order_relaxed);
        return m < n_ ? m : n_;
    }

    void loop(int i) {
        for (unsigned seen = 0;;) {
            unsigned g = gen_.load();
            if (g == seen || (g & 1)) {
                idle(g, i >= members());
                continue;
            }
            active_.fetch_add(1);
            if (gen_.load() == g) {           // still open: the job's fields are complete
                if (i < members()) work();
                seen = g;
            }
            active_.fetch_sub(1);
        }
    }

    void idle(unsigned g, bool benched) {
        long t = now_ns();
        for (long k = 1; gen_.load(std::memory_order_acquire) == g; k++) {
            relax();
            if (k % 256 == 0 && (benched || park_.load(std::memory_order_relaxed) || now_ns() - t > spin_ns_)) {
#if defined(__cpp_lib_atomic_wait)
                gen_.wait(g);
#else
                std::this_thread::sleep_for(std::chrono::microseconds(20));
#endif
            }
        }
    }

    const int n_;
    const long spin_ns_;
    Job job_{};
    std::vector<int> blocks_;
    long t0_ = 0, grain_[4] = {1, 1, 1, 1};
    Progress progress_[4];
    alignas(64) std::atomic<unsigned> gen_{0};
    alignas(64) std::atomic<int> active_{0};
    std::atomic<bool> park_{false};
};

}  // namespace
