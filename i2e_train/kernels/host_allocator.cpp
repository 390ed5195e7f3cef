// A CPU allocator for PyTorch whose resident memory follows the live tensors.
//
// c10's default CPU allocator takes every host tensor from posix_memalign(64, n). glibc serves
// that by carving an aligned block out of a larger free one and handing the spare ends back, so
// a freed n-byte block is too small for the next posix_memalign(64, n), and once glibc has raised
// its mmap threshold (it does after the first large free) big tensors live in the heap too. A
// training step frees and allocates tensors of a few sizes over and over; the heap grows instead
// of being reused, and the resident set ends at about twice the live tensors.
//
// Here:
// * blocks of kLargeBytes and more are mapped pages of their own. A freed one is kept for the next
//   request of its size class. A request no kept block serves maps a new block, first unmapping
//   kept blocks (oldest freed first) as far as needed for the mapped total (live + kept) to stay
//   within kHeadroom times the highest live total so far. Resident memory is thus bounded by the
//   live peak, and a training step, which repeats the sizes of the step before, finds most of its
//   blocks kept. Measured on MS-ResNet18 training steps (benchmarks/memory.py): no bound (keep
//   every freed block) costs as much memory as glibc; headroom 1 maps and zero-fills blocks over
//   and over (5-10% of a small step); 1.25 keeps the step time of PyTorch's allocator;
//   An optional limit on the kept bytes unmaps the oldest kept blocks at once beyond it: less
//   resident memory at a peak, more page faults (blocks mapped again);
// * smaller blocks come from malloc, n + 128 bytes aligned inside: one malloc size per request
//   size, which glibc's bins reuse exactly (mapping those too costs more page faults than it
//   saves memory).
// Every pointer handed out is 64-byte aligned, as c10's. A 64-byte header sits right before it;
// its last word is a cookie derived from the pointer (always >= 2^62, which no glibc chunk size
// reaches), so `release` recognises foreign pointers (memory from c10's raw_allocate taken before
// this allocator was installed and returned after, e.g. oneDNN scratch) and hands them to the
// default allocator's deleter.

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <unordered_map>

namespace {

constexpr std::size_t kAlignment = 64;
constexpr std::size_t kHeaderBytes = 64;
constexpr std::size_t kLargeBytes = 4 << 20;  // mapped (transparent huge pages advised) from here up
constexpr double kHeadroom = 1.25;            // mapped total <= kHeadroom * live peak (see above)
constexpr std::uint64_t kCookie = 0x4932'4531'686f'7374ULL;  // top byte 0x49: cookies are >= 2^62
constexpr std::uint64_t kReported = 1ULL << 63;              // size flag: reported to the profiler

struct Header {
  void* base;               // malloc'd pointer, or the mapping's start
  std::uint64_t capacity;   // mapping length; 0 for a malloc'd block
  std::uint64_t size;       // requested bytes (| kReported)
  Header* lru_prev;         // kept (freed) mapped blocks: oldest first
  Header* lru_next;
  Header* class_next;       // kept blocks of the same capacity
  Header* class_prev;
  std::uint64_t cookie;     // cookie_of(pointer); last word, right before the pointer
};
static_assert(sizeof(Header) == kHeaderBytes, "header size");

std::uint64_t cookie_of(const void* ptr) {
  return kCookie ^ static_cast<std::uint64_t>(reinterpret_cast<std::uintptr_t>(ptr));
}

void* data_of(Header* h) {
  return h + 1;
}

Header* header_of(void* ptr) {
  return static_cast<Header*>(ptr) - 1;
}

// The mapping length of a request: header + n rounded up to a size class (steps of 1/8 of the
// power of two below, at least a page), so that near sizes share kept blocks; the untouched
// tail pages of a block are never resident.
std::size_t capacity_for(std::size_t n) {
  const std::size_t need = n + kHeaderBytes;
  std::size_t top = std::size_t(1) << (63 - __builtin_clzll(need));
  std::size_t step = top / 8;
  const std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
  if (step < page) {
    step = page;
  }
  return (need + step - 1) / step * step;
}

struct Stats {
  std::atomic<std::size_t> allocated{0};  // bytes of live tensors
  std::atomic<std::size_t> peak{0};
  std::size_t kept = 0;                   // capacity of kept mapped blocks (under g_mutex)
  std::size_t mapped = 0;                 // capacity of all mapped blocks: live + kept (under g_mutex)
  std::size_t live_mapped_peak = 0;       // the highest capacity of live mapped blocks (under g_mutex)
  std::size_t maps = 0, unmaps = 0, reuses = 0;
};

Stats g_stats;
std::mutex g_mutex;
std::atomic<long long> g_keep_limit{-1};           // bytes of kept blocks at most; -1: no limit
std::unordered_map<std::size_t, Header*> g_kept;  // capacity -> kept blocks (class list)
Header* g_lru_head = nullptr;                     // oldest kept block
Header* g_lru_tail = nullptr;
c10::DeleterFnPtr g_default_deleter = nullptr;

void lru_remove(Header* h) {
  (h->lru_prev ? h->lru_prev->lru_next : g_lru_head) = h->lru_next;
  (h->lru_next ? h->lru_next->lru_prev : g_lru_tail) = h->lru_prev;
  h->lru_prev = h->lru_next = nullptr;
}

void class_remove(Header* h) {
  if (h->class_prev) {
    h->class_prev->class_next = h->class_next;
  } else if (h->class_next) {
    g_kept[h->capacity] = h->class_next;
  } else {
    g_kept.erase(h->capacity);
  }
  if (h->class_next) {
    h->class_next->class_prev = h->class_prev;
  }
  h->class_next = h->class_prev = nullptr;
}

void keep(Header* h) {  // under g_mutex
  h->lru_prev = g_lru_tail;
  h->lru_next = nullptr;
  (g_lru_tail ? g_lru_tail->lru_next : g_lru_head) = h;
  g_lru_tail = h;
  Header*& head = g_kept[h->capacity];
  h->class_prev = nullptr;
  h->class_next = head;
  if (head) {
    head->class_prev = h;
  }
  head = h;
  g_stats.kept += h->capacity;
}

Header* take_kept(std::size_t capacity) {  // under g_mutex
  auto it = g_kept.find(capacity);
  if (it == g_kept.end()) {
    return nullptr;
  }
  Header* h = it->second;
  class_remove(h);
  lru_remove(h);
  g_stats.kept -= h->capacity;
  ++g_stats.reuses;
  return h;
}

void unmap(Header* h) {  // under g_mutex; h is kept
  class_remove(h);
  lru_remove(h);
  g_stats.kept -= h->capacity;
  g_stats.mapped -= h->capacity;
  ++g_stats.unmaps;
  munmap(h->base, h->capacity);
}

// Unmap kept blocks, oldest first, until `bytes` are unmapped or none is kept.
void release_kept(std::size_t bytes) {  // under g_mutex
  std::size_t done = 0;
  while (g_lru_head != nullptr && done < bytes) {
    done += g_lru_head->capacity;
    unmap(g_lru_head);
  }
}

Header* map_block(std::size_t capacity) {  // under g_mutex
  const std::size_t live = g_stats.mapped - g_stats.kept;
  const auto bound = static_cast<std::size_t>(kHeadroom * static_cast<double>(g_stats.live_mapped_peak));
  const std::size_t allowed = std::max(bound, live + capacity);
  if (g_stats.mapped + capacity > allowed) {
    release_kept(g_stats.mapped + capacity - allowed);
  }
  void* base = mmap(nullptr, capacity, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) {
    return nullptr;
  }
  madvise(base, capacity, MADV_HUGEPAGE);  // fewer page faults (as numpy does); ignored where unsupported
  g_stats.mapped += capacity;
  g_stats.live_mapped_peak = std::max(g_stats.live_mapped_peak, g_stats.mapped - g_stats.kept);
  ++g_stats.maps;
  Header* h = static_cast<Header*>(base);
  h->base = base;
  h->capacity = capacity;
  return h;
}

void note_allocated(std::size_t n) {
  const std::size_t now = g_stats.allocated.fetch_add(n) + n;
  std::size_t peak = g_stats.peak.load();
  while (now > peak && !g_stats.peak.compare_exchange_weak(peak, now)) {
  }
}

void release(void* ptr) {
  if (ptr == nullptr) {
    return;
  }
  Header* h = header_of(ptr);
  if (h->cookie != cookie_of(ptr)) {
    g_default_deleter(ptr);  // not one of ours
    return;
  }
  const std::uint64_t size = h->size & ~kReported;
  const std::size_t total = g_stats.allocated.fetch_sub(size) - size;
  if (h->size & kReported) {
    c10::reportMemoryUsageToProfiler(ptr, -static_cast<std::int64_t>(size), total, 0,
                                     c10::Device(c10::DeviceType::CPU));
  }
  h->cookie = 0;
  if (h->capacity == 0) {
    std::free(h->base);
    return;
  }
  std::lock_guard<std::mutex> lock(g_mutex);
  keep(h);
  const long long limit = g_keep_limit.load();
  if (limit >= 0 && g_stats.kept > static_cast<std::size_t>(limit)) {
    release_kept(g_stats.kept - static_cast<std::size_t>(limit));
  }
}

void* take(std::size_t n) {
  if (n < kLargeBytes) {
    void* base = std::malloc(n + kHeaderBytes + kAlignment);
    if (base == nullptr) {
      return nullptr;
    }
    const std::uintptr_t start = reinterpret_cast<std::uintptr_t>(base) + kHeaderBytes;
    void* ptr = reinterpret_cast<void*>((start + kAlignment - 1) & ~(kAlignment - 1));
    Header* h = header_of(ptr);
    h->base = base;
    h->capacity = 0;
    return ptr;
  }
  const std::size_t capacity = capacity_for(n);
  std::lock_guard<std::mutex> lock(g_mutex);
  Header* h = take_kept(capacity);
  if (h == nullptr) {
    h = map_block(capacity);
  }
  return h == nullptr ? nullptr : data_of(h);
}

struct HostAllocator final : c10::Allocator {
  c10::DataPtr allocate(std::size_t n) override {
    const c10::Device cpu(c10::DeviceType::CPU);
    if (n == 0) {
      return {nullptr, nullptr, &release, cpu};
    }
    void* ptr = take(n);
    TORCH_CHECK_WITH(OutOfMemoryError, ptr != nullptr,
                     "i2e_train host allocator: not enough memory: you tried to allocate ", n, " bytes.");
    Header* h = header_of(ptr);
    h->size = n;
    h->cookie = cookie_of(ptr);
    note_allocated(n);
    if (c10::memoryProfilingEnabled()) {
      h->size |= kReported;
      c10::reportMemoryUsageToProfiler(ptr, static_cast<std::int64_t>(n), g_stats.allocated.load(), 0, cpu);
    }
    return {ptr, ptr, &release, cpu};
  }

  c10::DeleterFnPtr raw_deleter() const override {
    return &release;
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

HostAllocator g_allocator;

void lock_for_fork() {
  g_mutex.lock();
}

void unlock_after_fork() {
  g_mutex.unlock();
}

}  // namespace

extern "C" {

// Make this allocator PyTorch's CPU allocator (idempotent). Returns 1 when it is.
int i2e_host_allocator_install() {
  static std::once_flag once;
  std::call_once(once, [] {
    g_default_deleter = c10::GetDefaultCPUAllocator()->raw_deleter();
    pthread_atfork(&lock_for_fork, &unlock_after_fork, &unlock_after_fork);
    c10::SetCPUAllocator(&g_allocator, /*priority=*/1);
  });
  return c10::GetCPUAllocator() == &g_allocator ? 1 : 0;
}

// After install: 1 makes this allocator PyTorch's CPU allocator again, 0 hands new tensors to
// c10's default one (for side-by-side comparisons in one process). Every tensor keeps the
// deleter of the allocator it came from. Returns 1 when this allocator is PyTorch's now.
int i2e_host_allocator_use(int on) {
  c10::SetCPUAllocator(on ? static_cast<c10::Allocator*>(&g_allocator) : c10::GetDefaultCPUAllocator(), 1);
  return c10::GetCPUAllocator() == &g_allocator ? 1 : 0;
}

// Unmap every kept block (returns the bytes unmapped); the live peak starts again from now.
std::size_t i2e_host_allocator_release() {
  std::lock_guard<std::mutex> lock(g_mutex);
  const std::size_t kept = g_stats.kept;
  release_kept(kept);
  g_stats.live_mapped_peak = g_stats.mapped;
  return kept;
}

// Keep at most `limit` bytes of freed blocks (unmapping the oldest beyond it); -1: no limit.
void i2e_host_allocator_set_keep_limit(long long limit) {
  g_keep_limit.store(limit < 0 ? -1 : limit);
  std::lock_guard<std::mutex> lock(g_mutex);
  if (limit >= 0 && g_stats.kept > static_cast<std::size_t>(limit)) {
    release_kept(g_stats.kept - static_cast<std::size_t>(limit));
  }
}

// [allocated, peak allocated, kept, mapped, maps, unmaps, reuses]
void i2e_host_allocator_stats(std::uint64_t* out) {
  std::lock_guard<std::mutex> lock(g_mutex);
  out[0] = g_stats.allocated.load();
  out[1] = g_stats.peak.load();
  out[2] = g_stats.kept;
  out[3] = g_stats.mapped;
  out[4] = g_stats.maps;
  out[5] = g_stats.unmaps;
  out[6] = g_stats.reuses;
}

// What c10's raw_deallocate does with a pointer: free one of ours, pass any other to the default
// allocator's deleter.
void i2e_host_allocator_raw_deallocate(void* ptr) {
  release(ptr);
}

// Start a new peak from the bytes allocated now.
void i2e_host_allocator_reset_peak() {
  g_stats.peak.store(g_stats.allocated.load());
}

}  // extern "C"
