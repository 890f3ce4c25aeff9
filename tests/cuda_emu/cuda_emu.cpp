// The execution engine of the CUDA host emulation (see cuda_emu.h): a pool of host threads,
// one per CUDA thread of the running block, block barriers and warp exchanges with
// divergence / mask checks, a deadlock check and a watchdog, launch-configuration checks.
//
// Everything is guarded by one mutex G; each pool thread sleeps on its own semaphore, posted
// only after G is released (a woken thread never blocks on G at once), so that a barrier
// wakes exactly the threads it releases. Serial scheduling
// (default): one CUDA thread runs at a time, the baton passing at every barrier, warp
// operation and exit to the next ready thread in thread order (deterministic). Free
// scheduling (ADARTS_EMU_SCHED=free): all ready threads run at once.
//
// Adversarial schedules (one thread at a time as well, deterministic for a given setting):
//   reverse       at every scheduling point the ready thread with the highest index runs;
//   random[:SEED] the first ready thread of a permutation of the block's threads, a new
//                 permutation per barrier interval (from SEED, the kernel's name, the block
//                 index and the interval's number; SEED 1 by default).
// Both are greedy: the chosen thread (and its warp) runs ahead as far as it can before the
// others move, so a write that a missing barrier no longer holds back lands before another
// warp's read of the old value (write-after-read), or a read comes before the write it
// needs (read-after-write).
//   delayed       (added to any of serial, reverse, random: "reverse+delayed") every store to
//                 shared memory stays private to its thread until the next __syncthreads:
//                 between barriers each thread sees shared memory as it was at the last
//                 barrier plus its own stores, as if the other threads had not yet run. A read
//                 that lacks the barrier before it sees the old value whatever the order.
//                 Two threads storing different values to one byte between barriers fail the
//                 launch (a write-write race). Implemented by swapping: a thread's stores are
//                 taken out of the shared blocks when it gives up the baton and put back when
//                 it gets it again, so shared atomics and warp-synchronous shared-memory code
//                 (none in csrc/cuda) are not supported in this mode.
#include "cuda_emu.h"

#include <pthread.h>
#include <semaphore.h>

#include <chrono>
#include <condition_variable>
#include <cstdarg>
#include <cstdlib>
#include <mutex>
#include <new>
#include <string>
#include <vector>

namespace emu {
namespace {

struct Abort {};  // unwinds a CUDA thread after its launch failed

struct Error {
  int code;
  std::string msg;
};

enum class St { Ready, Bar, Warp, Done };

enum class Order { Serial, Reverse, Random, Free };

// The setting of a launch (ADARTS_EMU_SCHED, or emu_set_schedule from the harness).
struct Sched {
  Order order = Order::Serial;
  uint64_t seed = 1;
  bool delayed = false;
  bool ok = true;
  std::string spec;
};

// One shared-memory block of the running CUDA block and its contents at the last barrier.
struct Region {
  unsigned char* p = nullptr;
  size_t n = 0;
  std::vector<unsigned char> base;
};

// A store to shared memory not yet visible to the other threads (delayed mode).
struct Store {
  uint32_t region, off;
  unsigned char v;
};

struct Slot {
  St st = St::Ready;
  const char* file = nullptr;
  int line = 0;
  unsigned mask = 0;
  const char* what = nullptr;
  uint64_t val[2] = {0, 0};
  int phase = 0;       // warp operations done, mod 2 (the double buffer)
  unsigned got = 0;    // the participants of the last completed warp operation
  std::vector<Store> stores;  // delayed mode: this thread's shared stores since the last barrier
};

struct Block {
  const char* name = nullptr;
  dim3 grid, block, idx;
  int n = 0;
  bool serial = true;
  Order order = Order::Serial;
  uint64_t seed = 1;
  bool delayed = false;
  uint64_t interval = 0;     // barriers released so far
  std::vector<int> prio;     // reverse / random: the threads, highest priority first
  std::vector<Region> regions;  // delayed mode: the shared blocks
  const std::function<void()>* body = nullptr;
  std::vector<Slot> slots;
  int nready = 0, nbar = 0, ndone = 0, finished = 0;
  int baton = 0;
  bool failed = false;
  int code = 0;
  std::string msg;
  std::vector<std::pair<const void*, void*>> shared;
  void* dyn = nullptr;
  uint64_t progress = 0;
};

struct Worker {
  sem_t sem;
  uint64_t job = 0, seen = 0;
  Worker() { sem_init(&sem, 0, 0); }
};

std::mutex G;                      // guards everything below
std::condition_variable main_cv;   // the launching thread waits here
std::vector<Worker*> workers;      // never destroyed (threads may outlive static destruction)
Block* cur = nullptr;
std::vector<int> pending;          // threads to wake once G is released
bool wedged = false;               // a CUDA thread never came back: no further launch
int last_error = 0;
std::string last_message;
std::mutex atomic_mu;
bool sched_override = false;       // emu_set_schedule: its spec instead of ADARTS_EMU_SCHED
std::string sched_spec;

thread_local Block* tl_block = nullptr;
thread_local int tl_tid = -1;

// ------------------------------------------------------------------ options
// "serial" (default), "free", "reverse", "random" or "random:SEED", each optionally with
// "+delayed"; "delayed" alone is "serial+delayed". G held.
Sched read_sched() {
  Sched r;
  const char* env = std::getenv("ADARTS_EMU_SCHED");
  r.spec = sched_override ? sched_spec : (env ? env : "");
  bool have_order = false;
  size_t i = 0;
  while (i <= r.spec.size()) {
    size_t j = r.spec.find_first_of("+,", i);
    if (j == std::string::npos) j = r.spec.size();
    const std::string tok = r.spec.substr(i, j - i);
    i = j + 1;
    if (tok.empty()) continue;
    if (tok == "delayed") {
      r.delayed = true;
      continue;
    }
    if (have_order) r.ok = false;
    have_order = true;
    if (tok == "serial") r.order = Order::Serial;
    else if (tok == "free") r.order = Order::Free;
    else if (tok == "reverse") r.order = Order::Reverse;
    else if (tok == "random") r.order = Order::Random;
    else if (tok.compare(0, 7, "random:") == 0 && tok.size() > 7 &&
             tok.find_first_not_of("0123456789", 7) == std::string::npos) {
      r.order = Order::Random;
      r.seed = std::strtoull(tok.c_str() + 7, nullptr, 10);
    } else {
      r.ok = false;
    }
  }
  if (r.delayed && r.order == Order::Free) r.ok = false;  // needs one thread at a time
  return r;
}
double timeout_s() {
  const char* s = std::getenv("ADARTS_EMU_TIMEOUT");
  return s ? std::atof(s) : 30.0;
}
size_t smem_limit() {
  const char* s = std::getenv("ADARTS_EMU_SMEM_LIMIT");
  return s ? static_cast<size_t>(std::atoll(s)) : size_t(48) * 1024;
}

std::string vformat(const char* fmt, va_list ap) {
  char buf[1024];
  vsnprintf(buf, sizeof buf, fmt, ap);
  return buf;
}
std::string format(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::string s = vformat(fmt, ap);
  va_end(ap);
  return s;
}

// ------------------------------------------------------------------ scheduling (G held)
void wake(Block& b, int t) {
  (void)b;
  pending.push_back(t);
}

// Releases G, then posts the semaphores of the threads woken meanwhile.
void unlock_and_wake(std::unique_lock<std::mutex>& lk) {
  std::vector<sem_t*> w;  // the Worker objects live forever; `workers` itself may grow once G is free
  w.reserve(pending.size());
  for (int t : pending) w.push_back(&workers[t]->sem);
  pending.clear();
  lk.unlock();
  for (sem_t* s : w) sem_post(s);
}

// Sleeps (G released) until pred() holds; returns with G held. Extra posts are harmless.
template <typename Pred> void sleep_until(std::unique_lock<std::mutex>& lk, int t, Pred pred) {
  while (!pred()) {
    sem_t* mine = &workers[t]->sem;
    unlock_and_wake(lk);
    while (sem_wait(mine) != 0) {
    }
    lk.lock();
  }
}

uint64_t mix64(uint64_t x) {  // splitmix64's finaliser
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// The priority order of the block's current barrier interval (reverse / random).
void new_interval(Block& b) {
  if (b.order == Order::Reverse) {
    if (static_cast<int>(b.prio.size()) != b.n) {
      b.prio.resize(b.n);
      for (int t = 0; t < b.n; ++t) b.prio[t] = b.n - 1 - t;
    }
    return;
  }
  if (b.order != Order::Random) return;
  uint64_t h = 1469598103934665603ull;  // FNV-1a of the kernel's name
  for (const char* c = b.name; c && *c; ++c) h = (h ^ static_cast<unsigned char>(*c)) * 1099511628211ull;
  const uint64_t blk = (uint64_t(b.idx.z) * b.grid.y + b.idx.y) * b.grid.x + b.idx.x;
  uint64_t st = mix64(mix64(mix64(b.seed) ^ h) ^ blk) ^ mix64(b.interval);
  b.prio.resize(b.n);
  for (int t = 0; t < b.n; ++t) b.prio[t] = t;
  for (int t = b.n - 1; t > 0; --t) {  // Fisher-Yates
    st = mix64(st);
    const int k = static_cast<int>(st % static_cast<uint64_t>(t + 1));
    std::swap(b.prio[t], b.prio[k]);
  }
}

// Delayed mode: the running thread t gives up the baton. Its stores since the last barrier
// (the bytes that differ from the barrier's contents) are taken out of shared memory.
void save_view(Block& b, int t) {
  std::vector<Store>& st = b.slots[t].stores;
  st.clear();
  for (size_t r = 0; r < b.regions.size(); ++r) {
    Region& g = b.regions[r];
    const unsigned char* base = g.base.data();
    for (size_t o = 0; o < g.n; o += 64) {
      const size_t len = g.n - o < 64 ? g.n - o : 64;
      if (std::memcmp(g.p + o, base + o, len) == 0) continue;
      for (size_t k = o; k < o + len; ++k) {
        if (g.p[k] != base[k]) {
          st.push_back(Store{static_cast<uint32_t>(r), static_cast<uint32_t>(k), g.p[k]});
          g.p[k] = base[k];
        }
      }
    }
  }
}

// Delayed mode: thread t runs again; its own stores are visible to it.
void load_view(Block& b, int t) {
  for (const Store& s : b.slots[t].stores) b.regions[s.region].p[s.off] = s.v;
}

void fail_block(Block& b, int code, const std::string& msg);

// Delayed mode, at a barrier: every thread's stores become visible, in thread order.
void commit_stores(Block& b) {
  std::vector<std::vector<int>> owner(b.regions.size());
  for (int t = 0; t < b.n; ++t) {
    for (const Store& s : b.slots[t].stores) {
      Region& g = b.regions[s.region];
      std::vector<int>& own = owner[s.region];
      if (own.empty()) own.assign(g.n, -1);
      const int o = own[s.off];
      if (o >= 0 && g.p[s.off] != s.v) {
        fail_block(b, cudaErrorLaunchFailure,
                   format("shared-memory race: threads %d and %d store different values to byte %u of a shared "
                          "block (%zu bytes) between two barriers",
                          o, t, s.off, g.n));
        return;
      }
      own[s.off] = t;
      g.p[s.off] = s.v;
    }
    b.slots[t].stores.clear();
  }
  for (Region& g : b.regions) std::memcpy(g.base.data(), g.p, g.n);
}

void add_region(Block& b, void* p, size_t n) {
  Region g;
  g.p = static_cast<unsigned char*>(p);
  g.n = n;
  g.base.assign(g.p, g.p + n);
  b.regions.push_back(std::move(g));
}

void fail_block(Block& b, int code, const std::string& msg) {
  if (!b.failed) {
    b.failed = true;
    b.code = code;
    b.msg = msg;
  }
  for (int t = 0; t < b.n; ++t)
    if (b.slots[t].st != St::Done) wake(b, t);
  main_cv.notify_all();
}

void set_ready(Block& b, int t) {
  b.slots[t].st = St::Ready;
  ++b.nready;
  if (!b.serial) wake(b, t);
}

const char* base_name(const char* f) {
  const char* s = f ? std::strrchr(f, '/') : nullptr;
  return s ? s + 1 : (f ? f : "?");
}

// The warp of thread t: complete its pending operation if every lane of the mask is there.
void check_warp(Block& b, int t) {
  const int base = t & ~31, width = b.n - base < 32 ? b.n - base : 32;
  for (int l0 = 0; l0 < width; ++l0) {
    const Slot& s0 = b.slots[base + l0];
    if (s0.st != St::Warp) continue;
    bool complete = true;
    for (int l = 0; l < 32; ++l) {
      if (!((s0.mask >> l) & 1u)) continue;
      if (l >= width) {
        fail_block(b, cudaErrorLaunchFailure,
                   format("%s at %s:%d: mask 0x%08x names lane %d, which does not exist (warp %d has %d lanes)",
                          s0.what, base_name(s0.file), s0.line, s0.mask, l, base / 32, width));
        return;
      }
      const Slot& s = b.slots[base + l];
      if (s.st == St::Done) {
        fail_block(b, cudaErrorLaunchFailure,
                   format("%s at %s:%d (mask 0x%08x): lane %d of warp %d exited without taking part", s0.what,
                          base_name(s0.file), s0.line, s0.mask, l, base / 32));
        return;
      }
      if (s.st == St::Warp && (s.mask != s0.mask || s.file != s0.file || s.line != s0.line)) {
        fail_block(b, cudaErrorLaunchFailure,
                   format("warp %d: lane %d is at %s at %s:%d with mask 0x%08x while lane %d is at %s at %s:%d with "
                          "mask 0x%08x",
                          base / 32, l0, s0.what, base_name(s0.file), s0.line, s0.mask, l, s.what, base_name(s.file),
                          s.line, s.mask));
        return;
      }
      if (s.st != St::Warp) complete = false;
    }
    if (!complete) continue;
    for (int l = 0; l < 32; ++l) {
      if (!((s0.mask >> l) & 1u)) continue;
      Slot& s = b.slots[base + l];
      s.got = s0.mask;
      set_ready(b, base + l);
    }
    ++b.progress;
  }
}

void check_barrier(Block& b) {
  if (b.nbar == 0 || b.nbar + b.ndone < b.n) return;
  int first = -1;
  for (int t = 0; t < b.n; ++t) {
    const Slot& s = b.slots[t];
    if (s.st != St::Bar) continue;
    if (first < 0) { first = t; continue; }
    const Slot& f = b.slots[first];
    if (s.file != f.file || s.line != f.line) {
      fail_block(b, cudaErrorLaunchFailure,
                 format("divergent __syncthreads: thread %d waits at %s:%d, thread %d at %s:%d", first,
                        base_name(f.file), f.line, t, base_name(s.file), s.line));
      return;
    }
  }
  if (b.ndone > 0) {
    const Slot& f = b.slots[first];
    fail_block(b, cudaErrorLaunchFailure,
               format("divergent __syncthreads at %s:%d: %d threads wait there, %d threads of the block have exited",
                      base_name(f.file), f.line, b.nbar, b.ndone));
    return;
  }
  if (b.delayed) {
    commit_stores(b);
    if (b.failed) return;
  }
  b.nbar = 0;
  ++b.interval;
  new_interval(b);
  for (int t = 0; t < b.n; ++t) set_ready(b, t);
  ++b.progress;
}

// No thread can run and some have not finished: describe the waits.
void check_deadlock(Block& b) {
  if (b.failed || b.nready > 0 || b.ndone == b.n) return;
  std::string d;
  int shown = 0;
  for (int t = 0; t < b.n && shown < 4; ++t) {
    const Slot& s = b.slots[t];
    if (s.st == St::Bar || s.st == St::Warp) {
      d += format("%sthread %d at %s %s:%d", shown ? "; " : "", t, s.st == St::Bar ? "__syncthreads" : s.what,
                  base_name(s.file), s.line);
      ++shown;
    }
  }
  fail_block(b, cudaErrorLaunchFailure,
             format("deadlock: no thread can proceed (%d at __syncthreads, %d exited): %s", b.nbar, b.ndone,
                    d.c_str()));
}

// Serial scheduling: hand the baton to the next ready thread after `from` (reverse / random:
// to the first ready thread of the interval's order, which may be `from` itself).
void pass_baton(Block& b, int from) {
  if (!b.serial || b.failed) return;
  if (b.order != Order::Serial) {
    for (int t : b.prio) {
      if (b.slots[t].st == St::Ready) {
        b.baton = t;
        wake(b, t);  // an extra post when t == from: harmless
        return;
      }
    }
    return;
  }
  for (int k = 1; k <= b.n; ++k) {
    const int t = (from + k) % b.n;
    if (b.slots[t].st == St::Ready) {
      b.baton = t;
      wake(b, t);
      return;
    }
  }
}

// Wait (G held) until thread t may run; throws Abort when the launch failed meanwhile.
void wait_turn(std::unique_lock<std::mutex>& lk, Block& b, int t) {
  sleep_until(lk, t, [&] { return b.failed || (b.slots[t].st == St::Ready && (!b.serial || b.baton == t)); });
  if (b.failed) {
    unlock_and_wake(lk);
    throw Abort{};
  }
}

// The calling thread blocks in state st; returns when released (G held).
void block_on(std::unique_lock<std::mutex>& lk, Block& b, int t) {
  --b.nready;
  ++b.progress;
  if (b.delayed) save_view(b, t);
  if (b.slots[t].st == St::Warp) check_warp(b, t);
  else check_barrier(b);
  check_deadlock(b);
  if (b.slots[t].st != St::Ready || b.order != Order::Serial) pass_baton(b, t);
  wait_turn(lk, b, t);
  if (b.delayed) load_view(b, t);
}

Block& me() {
  if (tl_block == nullptr) {
    std::fprintf(stderr, "cuda_emu: a device function was called outside a kernel\n");
    std::abort();
  }
  return *tl_block;
}

// ------------------------------------------------------------------ the pool
void run_thread(Block& b, int t) {
  tl_block = &b;
  tl_tid = t;
  const unsigned bx = b.block.x, by = b.block.y;
  threadIdx = uint3{t % bx, (t / bx) % by, t / (bx * by)};
  blockIdx = uint3{b.idx.x, b.idx.y, b.idx.z};
  blockDim = b.block;
  gridDim = b.grid;
  try {
    (*b.body)();
  } catch (const Abort&) {
  } catch (const Error& e) {
    std::unique_lock<std::mutex> lk(G);
    fail_block(b, e.code, e.msg);
    unlock_and_wake(lk);
  } catch (const std::exception& e) {
    std::unique_lock<std::mutex> lk(G);
    fail_block(b, cudaErrorLaunchFailure, format("exception: %s", e.what()));
    unlock_and_wake(lk);
  }
  tl_block = nullptr;
  tl_tid = -1;
}

void* worker_main(void* arg) {
  const int t = static_cast<int>(reinterpret_cast<intptr_t>(arg));
  std::unique_lock<std::mutex> lk(G);
  Worker& w = *workers[t];
  for (;;) {
    // a new block, and (serial scheduling) the baton: only the thread whose turn it is wakes
    sleep_until(lk, t, [&] {
      return w.job != w.seen && cur != nullptr && (cur->failed || !cur->serial || cur->baton == t);
    });
    w.seen = w.job;
    Block& b = *cur;
    const bool run = !b.failed;
    if (run) {
      unlock_and_wake(lk);
      run_thread(b, t);
      lk.lock();
    }
    Slot& s = b.slots[t];
    if (run && b.delayed && !b.failed) save_view(b, t);  // kept until the next barrier
    if (s.st == St::Ready) --b.nready;
    if (s.st == St::Bar) --b.nbar;
    s.st = St::Done;
    ++b.ndone;
    ++b.progress;
    if (!b.failed) {
      check_warp(b, t);
      check_barrier(b);
      check_deadlock(b);
      pass_baton(b, t);
    }
    if (++b.finished == b.n) main_cv.notify_all();
  }
  return nullptr;
}

void grow_pool(int n) {
  while (static_cast<int>(workers.size()) < n) {
    workers.push_back(new Worker);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, size_t(2) << 20);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_t th;
    const int rc = pthread_create(&th, &attr, worker_main, reinterpret_cast<void*>(intptr_t(workers.size() - 1)));
    pthread_attr_destroy(&attr);
    if (rc != 0) {
      std::fprintf(stderr, "cuda_emu: pthread_create failed (%d)\n", rc);
      std::abort();
    }
  }
}

void record(int code, const std::string& msg) {
  if (last_error == 0) {
    last_error = code;
    last_message = msg;
  }
}

}  // namespace

// ------------------------------------------------------------------ device-side API
void fail(int code, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::string msg = vformat(fmt, ap);
  va_end(ap);
  if (tl_block == nullptr) {
    std::fprintf(stderr, "cuda_emu (host): %s\n", msg.c_str());
    std::abort();
  }
  throw Error{code, msg + format(" (block %u,%u,%u thread %u,%u,%u)", blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x,
                                 threadIdx.y, threadIdx.z)};
}

bool in_kernel() { return tl_block != nullptr; }
int lane_id() { return tl_tid & 31; }

void syncthreads(const char* file, int line) {
  Block& b = me();
  std::unique_lock<std::mutex> lk(G);
  Slot& s = b.slots[tl_tid];
  s.st = St::Bar;
  s.file = file;
  s.line = line;
  ++b.nbar;
  block_on(lk, b, tl_tid);
  unlock_and_wake(lk);
}

unsigned warp_exchange(unsigned mask, uint64_t mine, uint64_t* vals, const char* file, int line, const char* what) {
  Block& b = me();
  const int t = tl_tid, lane = t & 31;
  if (!((mask >> lane) & 1u))
    fail(cudaErrorLaunchFailure, "%s at %s:%d: lane %d calls it with mask 0x%08x, which does not name it", what,
         base_name(file), line, lane, mask);
  std::unique_lock<std::mutex> lk(G);
  Slot& s = b.slots[t];
  const int ph = s.phase;
  s.st = St::Warp;
  s.file = file;
  s.line = line;
  s.mask = mask;
  s.what = what;
  s.val[ph] = mine;
  block_on(lk, b, t);
  const int base = t & ~31;
  for (int l = 0; l < 32; ++l)
    vals[l] = ((s.got >> l) & 1u) ? b.slots[base + l].val[ph] : 0;
  s.phase = ph ^ 1;
  const unsigned got = s.got;
  unlock_and_wake(lk);
  return got;
}

void* shared_block(const void* key, size_t bytes, size_t align) {
  Block& b = me();
  std::lock_guard<std::mutex> lk(G);
  for (auto& kv : b.shared)
    if (kv.first == key) return kv.second;
  (void)align;  // every declaration's alignment is at most 64
  void* p = ::operator new(bytes, std::align_val_t(64));
  std::memset(p, 0xff, bytes);
  b.shared.emplace_back(key, p);
  if (b.delayed) add_region(b, p, bytes);
  return p;
}

void* dynamic_smem() { return me().dyn; }

void atomic_lock() { atomic_mu.lock(); }
void atomic_unlock() { atomic_mu.unlock(); }

// ------------------------------------------------------------------ launches
void launch_impl(const char* name, const char* file, int line, dim3 grid, dim3 block, size_t smem,
                 const std::function<void()>& body) {
  const std::string where = format("kernel %s (%s:%d)", name, base_name(file), line);
  std::unique_lock<std::mutex> lk(G);
  if (wedged) {
    record(cudaErrorLaunchFailure, where + ": not run, an earlier launch left a thread that never returned");
    return;
  }
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || uint64_t(grid.x) * grid.y * grid.z == 0) {
    record(cudaErrorInvalidConfiguration, format("%s: zero-size launch, grid (%u,%u,%u) block (%u,%u,%u)",
                                                 where.c_str(), grid.x, grid.y, grid.z, block.x, block.y, block.z));
    return;
  }
  if (block.x > 1024 || block.y > 1024 || block.z > 64 || threads > 1024) {
    record(cudaErrorInvalidConfiguration, format("%s: block (%u,%u,%u) over the limits (1024 threads; x, y <= 1024, "
                                                 "z <= 64)", where.c_str(), block.x, block.y, block.z));
    return;
  }
  if (grid.x > 2147483647u || grid.y > 65535u || grid.z > 65535u) {
    record(cudaErrorInvalidConfiguration, format("%s: grid (%u,%u,%u) over the limits (x < 2^31, y, z <= 65535)",
                                                 where.c_str(), grid.x, grid.y, grid.z));
    return;
  }
  if (smem > smem_limit()) {
    record(cudaErrorInvalidValue, format("%s: %zu bytes of dynamic shared memory, over the limit of %zu",
                                         where.c_str(), smem, smem_limit()));
    return;
  }
  const Sched sc = read_sched();
  if (!sc.ok) {
    record(cudaErrorInvalidValue, format("%s: unknown schedule \"%s\" (serial, free, reverse, random or random:SEED, "
                                         "optionally +delayed, not with free)", where.c_str(), sc.spec.c_str()));
    return;
  }
  const int n = static_cast<int>(threads);
  grow_pool(n);
  const double limit = timeout_s();
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        Block* bp = new Block;  // leaked only when a thread never returns (it still references it)
        Block& b = *bp;
        b.name = name;
        b.grid = grid;
        b.block = block;
        b.idx = dim3(x, y, z);
        b.n = n;
        b.serial = sc.order != Order::Free;
        b.order = sc.order;
        b.seed = sc.seed;
        b.delayed = sc.delayed;
        b.body = &body;
        b.slots.assign(n, Slot{});
        b.nready = n;
        b.dyn = ::operator new(smem > 0 ? smem : 1, std::align_val_t(16));
        std::memset(b.dyn, 0xff, smem > 0 ? smem : 1);
        if (b.delayed && smem > 0) add_region(b, b.dyn, smem);
        new_interval(b);
        if (!b.prio.empty()) b.baton = b.prio[0];
        cur = &b;
        for (int t = 0; t < n; ++t) ++workers[t]->job;
        if (b.serial) wake(b, b.baton);  // the baton holder
        else
          for (int t = 0; t < n; ++t) wake(b, t);
        // watchdog: no progress for `limit` seconds is a deadlock (a thread spinning)
        uint64_t seen = b.progress;
        auto last = std::chrono::steady_clock::now();
        bool timed_out = false;
        while (b.finished < n) {
          if (!pending.empty()) {
            unlock_and_wake(lk);
            lk.lock();
            continue;
          }
          main_cv.wait_for(lk, std::chrono::milliseconds(200));
          const auto now = std::chrono::steady_clock::now();
          if (b.progress != seen) {
            seen = b.progress;
            last = now;
          } else if (std::chrono::duration<double>(now - last).count() > limit) {
            if (!timed_out) {
              fail_block(b, cudaErrorLaunchTimeout,
                         format("deadlock: no progress for %.1f s (a thread spins or never reaches a barrier)", limit));
              timed_out = true;
              last = now;
            } else if (std::chrono::duration<double>(now - last).count() > (limit > 2 ? limit : 2) * 3) {
              wedged = true;  // some thread never came back: leave it, refuse further launches
              record(cudaErrorLaunchTimeout, where + ": " + b.msg + " (threads never returned)");
              cur = nullptr;
              return;  // b, body leak on purpose: the stuck thread still references them
            }
          }
        }
        for (auto& kv : b.shared) ::operator delete(kv.second, std::align_val_t(64));
        ::operator delete(b.dyn, std::align_val_t(16));
        cur = nullptr;
        const bool failed = b.failed;
        if (failed) record(b.code, where + ": " + b.msg);
        delete bp;
        if (failed) return;
      }
    }
  }
}

}  // namespace emu

cudaError_t cudaGetLastError() {
  std::lock_guard<std::mutex> lk(emu::G);
  const int e = emu::last_error;
  emu::last_error = 0;
  return static_cast<cudaError_t>(e);
}

cudaError_t cudaPeekAtLastError() {
  std::lock_guard<std::mutex> lk(emu::G);
  return static_cast<cudaError_t>(emu::last_error);
}

// ------------------------------------------------------------------ for the harness (ctypes)
extern "C" {
// The message of the first error since the last emu_reset (empty when none).
const char* emu_message() {
  static thread_local std::string copy;
  std::lock_guard<std::mutex> lk(emu::G);
  copy = emu::last_message;
  return copy.c_str();
}
// The schedule of the following launches (the syntax of ADARTS_EMU_SCHED); nullptr: the
// environment's again.
void emu_set_schedule(const char* spec) {
  std::lock_guard<std::mutex> lk(emu::G);
  emu::sched_override = spec != nullptr;
  emu::sched_spec = spec ? spec : "";
}
void emu_reset() {
  std::lock_guard<std::mutex> lk(emu::G);
  emu::last_error = 0;
  emu::last_message.clear();
}
void emu_float_to_half(const float* in, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __float2half_rn(in[i]).x;
}
void emu_float_to_bfloat16(const float* in, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __float2bfloat16_rn(in[i]).x;
}
void emu_half_to_float(const uint16_t* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __half2float(__half{in[i]});
}
}
