// Tile-based CPU rasterizer for projected 3D Gaussians (the algorithm of gsplat's CUDA kernels, on
// CPU cores with OpenMP).  Built on first use by gvae_ns/render/extension.py (g++ -O3 -fopenmp, a
// plain C interface called through ctypes: no PyTorch headers, so it compiles in seconds).  The Python
// side owns projection, SH, memory and autograd; this file owns intersection and compositing.
//
// Contract (shared with the pure-PyTorch reference, gvae_ns/render/composite_torch.py):
//  * a Gaussian touches the tiles (tile_size x tile_size pixels) its radius box overlaps, as
//    gsplat's isect_tiles; tiles where its alpha cannot reach alpha_min anywhere are dropped (an exact
//    ellipse/box test, so nothing visible is lost);
//  * every tile keeps its Gaussians front to back (depth, ties by index);
//  * per pixel: alpha = min(alpha_max, opacity * exp(-sigma)), pairs with alpha < alpha_min skipped;
//    the pixel stops before the Gaussian that would take its transmittance to <= t_min;
//  * the backward pass walks each pixel's list back to front from the saved final transmittance and
//    the saved count of list entries it consumed, recomputing alphas.
// Inside a tile, every 4x4 block of pixels keeps the positions of the entries that can reach it; in
// float, the block's 16 pixels walk that list in lockstep with SSE2 (baseline x86-64, so no -march
// flag), each lane doing exactly what a per-pixel walk does. float64 takes the scalar per-pixel walk.
// Gradients are accumulated per (tile, list entry) pair, one tile per thread at a time, then summed
// per Gaussian in a fixed order: results do not depend on the number of threads, and no atomics.
// SH colours (degrees 0..3) and their backward are here too; projection stays in PyTorch.

#if defined(__SSE2__)
#include <emmintrin.h>  // SSE2: part of every x86-64 CPU, so no -march flag is needed
#define GVR_SSE2 1
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <utility>
#include <vector>

namespace {

// Minimum over d in [lx, hx] x [ly, hy] of 0.5 (a dx^2 + c dy^2) + b dx dy, for a positive definite
// conic: zero if the box holds the origin, else the minimum along the four edges.
double min_sigma_in_box(double a, double b, double c, double lx, double hx, double ly, double hy) {
  if (lx <= 0 && hx >= 0 && ly <= 0 && hy >= 0) return 0.0;
  auto sigma = [&](double dx, double dy) { return 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy; };
  auto along_y = [&](double dx) { return sigma(dx, std::min(std::max(-b * dx / c, ly), hy)); };
  auto along_x = [&](double dy) { return sigma(std::min(std::max(-b * dy / a, lx), hx), dy); };
  return std::min(std::min(along_y(lx), along_y(hx)), std::min(along_x(ly), along_x(hy)));
}

// Whether some d in the box has 0.5 d^T conic d <= thresh; a cheap accept at the box centre first
// (most boxes a large Gaussian reaches), then the exact minimum.
inline bool box_reaches(double a, double b, double c, double lx, double hx, double ly, double hy, double thresh) {
  const double mx = 0.5 * (lx + hx), my = 0.5 * (ly + hy);
  if (0.5 * (a * mx * mx + c * my * my) + b * mx * my <= thresh) return true;
  return min_sigma_in_box(a, b, c, lx, hx, ly, hy) <= thresh;
}

// gsplat's tile range [x0, x1) x [y0, y1) of a radius box, in the working precision (bit-identical
// to gvae_ns.render.contract.tile_box).
template <typename scalar_t>
void tile_box(scalar_t mx, scalar_t my, int32_t radius, int tile_size, int tiles_x, int tiles_y,
              int& x0, int& x1, int& y0, int& y1) {
  const scalar_t ts = static_cast<scalar_t>(tile_size);
  const scalar_t r = static_cast<scalar_t>(radius) / ts;
  const scalar_t tx = mx / ts, ty = my / ts;
  auto clampi = [](scalar_t v, int hi) -> int {
    if (!(v > 0)) return 0;  // also maps NaN to 0
    return v >= static_cast<scalar_t>(hi) ? hi : static_cast<int>(v);
  };
  x0 = clampi(std::floor(tx - r), tiles_x);
  x1 = clampi(std::ceil(tx + r), tiles_x);
  y0 = clampi(std::floor(ty - r), tiles_y);
  y1 = clampi(std::ceil(ty + r), tiles_y);
}

struct Geometry {
  int C, N, width, height, tile_size, tiles_x, tiles_y, threads;
  int64_t tiles() const { return static_cast<int64_t>(tiles_x) * tiles_y; }
};

// Visits the tiles of flat Gaussian f (= camera * N + index) that can hold a pixel with
// alpha >= alpha_min; calls fn(flat tile id).
template <typename scalar_t, typename Fn>
void for_each_tile(const Geometry& g, int64_t f, const scalar_t* means2d, const scalar_t* conics,
                   const scalar_t* opac, const int32_t* radii, double alpha_min, Fn&& fn) {
  const int32_t radius = radii[f];
  const scalar_t op = opac[f];
  if (radius <= 0 || !(op >= static_cast<scalar_t>(alpha_min))) return;
  const int cam = static_cast<int>(f / g.N);
  const scalar_t mx = means2d[2 * f], my = means2d[2 * f + 1];
  int x0, x1, y0, y1;
  tile_box<scalar_t>(mx, my, radius, g.tile_size, g.tiles_x, g.tiles_y, x0, x1, y0, y1);
  const double a = conics[3 * f], b = conics[3 * f + 1], c = conics[3 * f + 2];
  const double level = std::log(static_cast<double>(op) / alpha_min);  // alpha >= alpha_min <=> sigma <= level
  const double tol = level * 1e-4 + 1e-4;
  const int ts = g.tile_size;
  for (int ty = y0; ty < y1; ++ty) {
    const double lo_y = ty * ts + 0.5, hi_y = std::min((ty + 1) * ts, g.height) - 0.5;
    for (int tx = x0; tx < x1; ++tx) {
      const double lo_x = tx * ts + 0.5, hi_x = std::min((tx + 1) * ts, g.width) - 0.5;
      if (box_reaches(a, b, c, mx - hi_x, mx - lo_x, my - hi_y, my - lo_y, level + tol)) fn(static_cast<int64_t>(cam) * g.tiles() + static_cast<int64_t>(ty) * g.tiles_x + tx);
    }
  }
}

// Binning, in two calls so that the caller allocates the outputs once their size is known.
// count_pairs: goff[f + 1] = number of tiles of flat Gaussian f, then the prefix sum (goff[0] = 0).
template <typename scalar_t>
int64_t count_pairs(const Geometry& g, const scalar_t* means2d, const scalar_t* conics, const scalar_t* opac,
                    const int32_t* radii, double alpha_min, int64_t* goff) {
  const int64_t CN = static_cast<int64_t>(g.C) * g.N;
  goff[0] = 0;
#pragma omp parallel for schedule(dynamic, 256) num_threads(g.threads)
  for (int64_t f = 0; f < CN; ++f) {
    int64_t count = 0;
    for_each_tile<scalar_t>(g, f, means2d, conics, opac, radii, alpha_min, [&](int64_t) { ++count; });
    goff[f + 1] = count;
  }
  for (int64_t f = 0; f < CN; ++f) goff[f + 1] += goff[f];
  return goff[CN];
}

// fill_bins: per-tile lists front to back (depth, ties by index) and each pair's list slot.
//   toff [C*tiles + 1]: tile t's list is ids[toff[t] : toff[t + 1]] (flat Gaussian ids)
//   slot [P]: slot[goff[f] + i] = position in ids of Gaussian f's i-th pair
template <typename scalar_t>
void fill_bins(const Geometry& g, const scalar_t* means2d, const scalar_t* conics, const scalar_t* opac,
               const int32_t* radii, const scalar_t* depths, double alpha_min, const int64_t* goff, int64_t* toff,
               int32_t* ids, int32_t* slot) {
  const int64_t CN = static_cast<int64_t>(g.C) * g.N;
  const int64_t n_tiles = g.C * g.tiles();
  const int64_t P = goff[CN];

  // the tile of every pair, in flat Gaussian order
  std::vector<int32_t> pair_tile(P);
#pragma omp parallel for schedule(dynamic, 256) num_threads(g.threads)
  for (int64_t f = 0; f < CN; ++f) {
    int64_t j = goff[f];
    for_each_tile<scalar_t>(g, f, means2d, conics, opac, radii, alpha_min,
                            [&](int64_t t) { pair_tile[j++] = static_cast<int32_t>(t); });
  }

  // per-camera depth order of the Gaussians that have pairs (ties by index)
  std::vector<std::vector<int32_t>> order(g.C);
#pragma omp parallel for schedule(dynamic, 1) num_threads(g.threads)
  for (int cam = 0; cam < g.C; ++cam) {
    std::vector<std::pair<scalar_t, int32_t>> keyed;
    const int64_t base = static_cast<int64_t>(cam) * g.N;
    for (int32_t n = 0; n < g.N; ++n)
      if (goff[base + n + 1] > goff[base + n]) keyed.emplace_back(depths[base + n], n);
    std::sort(keyed.begin(), keyed.end());
    order[cam].reserve(keyed.size());
    for (const auto& kv : keyed) order[cam].push_back(kv.second);
  }

  // counting sort of the pairs by tile, visiting Gaussians front to back
  std::fill(toff, toff + n_tiles + 1, int64_t(0));
  for (int64_t j = 0; j < P; ++j) ++toff[pair_tile[j] + 1];
  for (int64_t t = 0; t < n_tiles; ++t) toff[t + 1] += toff[t];
  std::vector<int64_t> cursor(toff, toff + n_tiles);
  for (int cam = 0; cam < g.C; ++cam) {
    const int64_t base = static_cast<int64_t>(cam) * g.N;
    for (int32_t n : order[cam]) {
      const int64_t f = base + n;
      for (int64_t j = goff[f]; j < goff[f + 1]; ++j) {
        const int64_t s = cursor[pair_tile[j]]++;
        ids[s] = static_cast<int32_t>(f);
        slot[j] = static_cast<int32_t>(s);
      }
    }
  }
}

// One list entry, packed so that a pixel's walk touches one cache line per two entries.
template <typename scalar_t>
struct Entry {
  scalar_t mx, my, a, b, c, op;
  scalar_t skip;  // sigma above this cannot give alpha >= alpha_min (margin far above round-off)
  scalar_t level; // log(op / alpha_min): alpha >= alpha_min <=> sigma <= level
};

// A tile's list gathered into contiguous memory, reused across tiles by each thread.
template <typename scalar_t>
struct TileList {
  std::vector<Entry<scalar_t>> e;
  std::vector<scalar_t> col;
  int64_t K = 0;
  void gather(const int32_t* ids, int64_t K_, int D, const Entry<scalar_t>* packed, const scalar_t* colors) {
    K = K_;
    e.resize(K);
    col.resize(K * D);
    for (int64_t k = 0; k < K; ++k) {
      const int64_t f = ids[k];
      e[k] = packed[f];
      for (int d = 0; d < D; ++d) col[k * D + d] = colors[f * D + d];
    }
  }
};

// Every Gaussian's entry, built once per call in flat order: a tile's gather then reads one packed
// record per list entry (instead of four scattered arrays) and the logarithm is taken once.
template <typename scalar_t>
std::vector<Entry<scalar_t>> pack_entries(const Geometry& g, const scalar_t* means2d, const scalar_t* conics,
                                          const scalar_t* opac, double alpha_min) {
  const int64_t CN = static_cast<int64_t>(g.C) * g.N;
  std::vector<Entry<scalar_t>> packed(CN);
#pragma omp parallel for schedule(static) num_threads(g.threads)
  for (int64_t f = 0; f < CN; ++f) {
    Entry<scalar_t>& x = packed[f];
    x.mx = means2d[2 * f];
    x.my = means2d[2 * f + 1];
    x.a = conics[3 * f];
    x.b = conics[3 * f + 1];
    x.c = conics[3 * f + 2];
    x.op = opac[f];
    const double level = std::log(static_cast<double>(x.op) / alpha_min);
    x.level = static_cast<scalar_t>(level);
    x.skip = static_cast<scalar_t>(level + 1e-3);
  }
  return packed;
}

struct Consts {
  double alpha_min, alpha_max, t_min;
};

// exp of the per-pixel exponents. float: a branch-free Cephes-style expf (within 1.3 ulp of exp on
// [-8, 0]) written once in scalar code and once in SSE2 (fast_exp4) with the same operations in the
// same order, so the vectorized forward and the scalar backward get bit-identical alphas. No clamp:
// it is only used where sigma <= skip (about 6.6 at most); far outside (x < -87) it is meaningless.
// double: std::exp (the path the float64 tests use).
inline float fast_exp(float x) {
  const float t = x * 1.44269504088896341f;
  const float m = t + 12582912.0f;  // 1.5 * 2^23: the low mantissa bits of m hold round(t)
  const float fn = m - 12582912.0f;
  uint32_t mb;
  std::memcpy(&mb, &m, sizeof(mb));
  const uint32_t n = mb - 0x4B400000u;
  const float r = (x - fn * 0.693359375f) + fn * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const uint32_t bits = (n + 127u) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
inline double fast_exp(double x) { return std::exp(x); }

#if GVR_SSE2
inline __m128 fast_exp4(__m128 x) {
  const __m128 t = _mm_mul_ps(x, _mm_set1_ps(1.44269504088896341f));
  const __m128 m = _mm_add_ps(t, _mm_set1_ps(12582912.0f));
  const __m128 fn = _mm_sub_ps(m, _mm_set1_ps(12582912.0f));
  const __m128i n = _mm_sub_epi32(_mm_castps_si128(m), _mm_set1_epi32(0x4B400000));
  const __m128 r = _mm_add_ps(_mm_sub_ps(x, _mm_mul_ps(fn, _mm_set1_ps(0.693359375f))),
                              _mm_mul_ps(fn, _mm_set1_ps(2.12194440e-4f)));
  __m128 p = _mm_set1_ps(1.9875691500e-4f);
  p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(1.3981999507e-3f));
  p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(8.3334519073e-3f));
  p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(4.1665795894e-2f));
  p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(1.6666665459e-1f));
  p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(5.0000001201e-1f));
  p = _mm_add_ps(_mm_add_ps(_mm_mul_ps(_mm_mul_ps(p, r), r), r), _mm_set1_ps(1.0f));
  const __m128i bits = _mm_slli_epi32(_mm_add_epi32(n, _mm_set1_epi32(127)), 23);
  return _mm_mul_ps(p, _mm_castsi128_ps(bits));
}
#endif

// alpha of list entry k at pixel centre (px, py); returns false when the pair is skipped.
template <typename scalar_t>
inline bool entry_alpha(const Entry<scalar_t>& E, scalar_t px, scalar_t py, scalar_t amin, scalar_t amax,
                        scalar_t& dx, scalar_t& dy, scalar_t& raw, scalar_t& alpha) {
  dx = E.mx - px;
  dy = E.my - py;
  const scalar_t sigma = static_cast<scalar_t>(0.5) * (E.a * dx * dx + E.c * dy * dy) + E.b * dx * dy;
  if (sigma > E.skip) return false;
  raw = E.op * fast_exp(-sigma);
  if (!(raw >= amin)) return false;
  alpha = raw < amax ? raw : amax;
  return true;
}

// Inside a tile, each 4x4 block of pixels gets the (increasing) list positions of the entries whose
// alpha >= alpha_min region reaches one of its pixel centres, so a pixel visits only those instead
// of the whole tile list.  Same entries in the same order as the per-pixel walk over the whole
// list would use: results are unchanged, only the misses are skipped.
constexpr int kBlock = 4;

struct TileFrame {
  int cam, x0, y0, w, h, nbx, nby;  // tile origin and size in pixels (clipped to the image), blocks
  int block_of(int x, int y) const { return ((y - y0) / kBlock) * nbx + (x - x0) / kBlock; }
};

TileFrame tile_frame(const Geometry& g, int64_t t) {
  TileFrame f;
  f.cam = static_cast<int>(t / g.tiles());
  const int64_t local = t % g.tiles();
  f.x0 = static_cast<int>(local % g.tiles_x) * g.tile_size;
  f.y0 = static_cast<int>(local / g.tiles_x) * g.tile_size;
  f.w = std::min(g.tile_size, g.width - f.x0);
  f.h = std::min(g.tile_size, g.height - f.y0);
  f.nbx = (f.w + kBlock - 1) / kBlock;
  f.nby = (f.h + kBlock - 1) / kBlock;
  return f;
}

template <typename scalar_t>
void block_lists(const TileList<scalar_t>& L, const TileFrame& f, std::vector<std::vector<int32_t>>& lists) {
  lists.resize(static_cast<size_t>(f.nbx) * f.nby);
  for (auto& l : lists) l.clear();
  for (int64_t k = 0; k < L.K; ++k) {
    const Entry<scalar_t>& E = L.e[k];
    const double mx = E.mx, my = E.my, a = E.a, b = E.b, c = E.c, level = E.level;
    const double tol = level * 1e-4 + 1e-4;
    const double det = a * c - b * b;
    int bx0 = 0, bx1 = f.nbx, by0 = 0, by1 = f.nby;  // block range of the ellipse's bounding box
    if (det > 0 && level >= 0) {
      const double ex = std::sqrt(2.0 * (level + tol) * c / det) + 1e-3;
      const double ey = std::sqrt(2.0 * (level + tol) * a / det) + 1e-3;
      // pixel x with centre x + 0.5 in [mx - ex, mx + ex]
      const double lo_x = std::ceil(mx - ex - 0.5) - f.x0, hi_x = std::floor(mx + ex - 0.5) - f.x0;
      const double lo_y = std::ceil(my - ey - 0.5) - f.y0, hi_y = std::floor(my + ey - 0.5) - f.y0;
      if (!(hi_x >= 0 && hi_y >= 0 && lo_x < f.w && lo_y < f.h)) continue;
      bx0 = static_cast<int>(std::max(0.0, lo_x)) / kBlock;
      bx1 = static_cast<int>(std::min<double>(f.w - 1, hi_x)) / kBlock + 1;
      by0 = static_cast<int>(std::max(0.0, lo_y)) / kBlock;
      by1 = static_cast<int>(std::min<double>(f.h - 1, hi_y)) / kBlock + 1;
    }
    for (int by = by0; by < by1; ++by) {
      const double py_lo = f.y0 + by * kBlock + 0.5, py_hi = f.y0 + std::min(f.h, (by + 1) * kBlock) - 0.5;
      for (int bx = bx0; bx < bx1; ++bx) {
        const double px_lo = f.x0 + bx * kBlock + 0.5, px_hi = f.x0 + std::min(f.w, (bx + 1) * kBlock) - 0.5;
        if (box_reaches(a, b, c, mx - px_hi, mx - px_lo, my - py_hi, my - py_lo, level + tol))
          lists[by * f.nbx + bx].push_back(static_cast<int32_t>(k));
      }
    }
  }
}

// DC > 0: the channel count, known at compile time (the common 1, 3, 4); DC == 0: D at run time.
template <typename scalar_t, int DC>
void forward_tiles(const Geometry& g, const int64_t* toff, const int32_t* ids, const scalar_t* means2d,
                   const scalar_t* conics, const scalar_t* colors, const scalar_t* opac, int D_, const Consts& k,
                   scalar_t* out, scalar_t* t_final, int32_t* last) {
  const int D = DC > 0 ? DC : D_;
  const int64_t n_tiles = g.C * g.tiles();
  const scalar_t amin = static_cast<scalar_t>(k.alpha_min), amax = static_cast<scalar_t>(k.alpha_max);
  const scalar_t tmin = static_cast<scalar_t>(k.t_min);
  const std::vector<Entry<scalar_t>> packed = pack_entries(g, means2d, conics, opac, k.alpha_min);
#pragma omp parallel num_threads(g.threads)
  {
    TileList<scalar_t> L;
    std::vector<std::vector<int32_t>> lists;
    std::vector<scalar_t> acc(D);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < n_tiles; ++t) {
      const TileFrame f = tile_frame(g, t);
      L.gather(ids + toff[t], toff[t + 1] - toff[t], D, packed.data(), colors);
      block_lists(L, f, lists);
      for (int y = f.y0; y < f.y0 + f.h; ++y) {
        for (int x = f.x0; x < f.x0 + f.w; ++x) {
          const int64_t p = (static_cast<int64_t>(f.cam) * g.height + y) * g.width + x;
          const scalar_t px = static_cast<scalar_t>(x) + static_cast<scalar_t>(0.5);
          const scalar_t py = static_cast<scalar_t>(y) + static_cast<scalar_t>(0.5);
          std::fill(acc.begin(), acc.end(), scalar_t(0));
          scalar_t T = 1;
          int32_t n_used = 0;  // list entries consumed: last contributing position + 1 (gsplat's last_ids)
          for (const int32_t i : lists[f.block_of(x, y)]) {
            scalar_t dx, dy, raw, alpha;
            if (!entry_alpha(L.e[i], px, py, amin, amax, dx, dy, raw, alpha)) continue;
            const scalar_t next_T = T * (1 - alpha);
            if (next_T <= tmin) break;
            const scalar_t w = alpha * T;
            const scalar_t* ci = &L.col[static_cast<int64_t>(i) * D];
            for (int d = 0; d < D; ++d) acc[d] += w * ci[d];
            T = next_T;
            n_used = i + 1;
          }
          for (int d = 0; d < D; ++d) out[p * D + d] = acc[d];
          t_final[p] = T;
          last[p] = n_used;
        }
      }
    }
  }
}

#if GVR_SSE2
// The float forward with SSE2: the 16 pixels of a 4x4 block walk the block's list in lockstep, four
// lanes per register. Per pixel it does exactly what forward_tiles does (same operations, same order,
// same stopping rule), so results are bit-identical to the scalar walk; it only stops a block when all
// of its pixels have stopped.
template <int DC>
void forward_tiles_sse(const Geometry& g, const int64_t* toff, const int32_t* ids, const float* means2d,
                       const float* conics, const float* colors, const float* opac, int D_, const Consts& k,
                       float* out, float* t_final, int32_t* last) {
  static_assert(kBlock == 4, "one SSE register per block row");
  const int D = DC > 0 ? DC : D_;
  const int64_t n_tiles = g.C * g.tiles();
  const __m128 amin = _mm_set1_ps(static_cast<float>(k.alpha_min));
  const __m128 amax = _mm_set1_ps(static_cast<float>(k.alpha_max));
  const __m128 tmin = _mm_set1_ps(static_cast<float>(k.t_min));
  const __m128 half = _mm_set1_ps(0.5f), one = _mm_set1_ps(1.0f);
  const __m128 sign = _mm_set1_ps(-0.0f);
  const std::vector<Entry<float>> packed = pack_entries(g, means2d, conics, opac, k.alpha_min);
#pragma omp parallel num_threads(g.threads)
  {
    TileList<float> L;
    std::vector<std::vector<int32_t>> lists;
    std::vector<float> acc_buf(static_cast<size_t>(D) * kBlock * kBlock);  // [D][row][lane]
    float* acc = acc_buf.data();
    alignas(16) float lane_f[4];
    alignas(16) int32_t lane_i[4];
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < n_tiles; ++t) {
      const TileFrame f = tile_frame(g, t);
      L.gather(ids + toff[t], toff[t + 1] - toff[t], D, packed.data(), colors);
      block_lists(L, f, lists);
      for (int by = 0; by < f.nby; ++by) {
        for (int bx = 0; bx < f.nbx; ++bx) {
          const int x0 = f.x0 + bx * kBlock, y0 = f.y0 + by * kBlock;
          const int w = std::min(kBlock, f.x0 + f.w - x0), h = std::min(kBlock, f.y0 + f.h - y0);
          const __m128 px = _mm_add_ps(_mm_set_ps(x0 + 3.0f, x0 + 2.0f, x0 + 1.0f, x0 + 0.0f), half);
          __m128 py[4], T[4], live[4];
          __m128i n_used[4];
          int n_live = 0;
          for (int r = 0; r < 4; ++r) {
            py[r] = _mm_set1_ps(static_cast<float>(y0 + r) + 0.5f);
            T[r] = one;
            n_used[r] = _mm_setzero_si128();
            for (int q = 0; q < 4; ++q) lane_i[q] = (r < h && q < w) ? -1 : 0;
            live[r] = _mm_castsi128_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(lane_i)));
            n_live += (r < h) ? w : 0;
          }
          std::fill(acc, acc + D * kBlock * kBlock, 0.0f);
          for (const int32_t i : lists[by * f.nbx + bx]) {
            const Entry<float>& E = L.e[i];
            const float* ci = &L.col[static_cast<int64_t>(i) * D];
            const __m128 dx = _mm_sub_ps(_mm_set1_ps(E.mx), px);
            const __m128 a = _mm_set1_ps(E.a), b = _mm_set1_ps(E.b), c = _mm_set1_ps(E.c);
            const __m128 adxdx = _mm_mul_ps(_mm_mul_ps(a, dx), dx), bdx = _mm_mul_ps(b, dx);
            const __m128i next_id = _mm_set1_epi32(i + 1);
            int n_stop = 0;
            for (int r = 0; r < 4; ++r) {
              const __m128 dy = _mm_sub_ps(_mm_set1_ps(E.my), py[r]);
              const __m128 sigma = _mm_add_ps(_mm_mul_ps(half, _mm_add_ps(adxdx, _mm_mul_ps(_mm_mul_ps(c, dy), dy))),
                                              _mm_mul_ps(bdx, dy));
              const __m128 raw = _mm_mul_ps(_mm_set1_ps(E.op), fast_exp4(_mm_xor_ps(sigma, sign)));
              const __m128 hit = _mm_and_ps(_mm_and_ps(_mm_cmple_ps(sigma, _mm_set1_ps(E.skip)),
                                                       _mm_cmpge_ps(raw, amin)), live[r]);
              if (_mm_movemask_ps(hit) == 0) continue;
              const __m128 alpha = _mm_and_ps(hit, _mm_min_ps(raw, amax));
              const __m128 next_T = _mm_mul_ps(T[r], _mm_sub_ps(one, alpha));
              const __m128 stop = _mm_and_ps(hit, _mm_cmple_ps(next_T, tmin));
              const __m128 take = _mm_andnot_ps(stop, hit);
              const __m128 wgt = _mm_and_ps(take, _mm_mul_ps(alpha, T[r]));
              for (int d = 0; d < D; ++d) {
                float* ad = acc + (d * 4 + r) * 4;
                _mm_storeu_ps(ad, _mm_add_ps(_mm_loadu_ps(ad), _mm_mul_ps(wgt, _mm_set1_ps(ci[d]))));
              }
              T[r] = _mm_or_ps(_mm_and_ps(take, next_T), _mm_andnot_ps(take, T[r]));
              const __m128i take_i = _mm_castps_si128(take);
              n_used[r] = _mm_or_si128(_mm_and_si128(take_i, next_id), _mm_andnot_si128(take_i, n_used[r]));
              live[r] = _mm_andnot_ps(stop, live[r]);
              n_stop += __builtin_popcount(_mm_movemask_ps(stop));
            }
            n_live -= n_stop;
            if (n_live == 0) break;
          }
          for (int r = 0; r < h; ++r) {
            const int64_t row = (static_cast<int64_t>(f.cam) * g.height + y0 + r) * g.width + x0;
            _mm_store_ps(lane_f, T[r]);
            for (int q = 0; q < w; ++q) t_final[row + q] = lane_f[q];
            _mm_store_si128(reinterpret_cast<__m128i*>(lane_i), n_used[r]);
            for (int q = 0; q < w; ++q) last[row + q] = lane_i[q];
            for (int d = 0; d < D; ++d) {
              const float* ad = acc + (d * 4 + r) * 4;
              for (int q = 0; q < w; ++q) out[(row + q) * D + d] = ad[q];
            }
          }
        }
      }
    }
  }
}

#endif  // GVR_SSE2

// Per-pair gradient row: v_mean x, y, v_conic a, b, c, v_opacity, |v_mean| x, y, v_color[D].
constexpr int kRowFixed = 8;

template <typename scalar_t, int DC>
void backward_tiles(const Geometry& g, const int64_t* toff, const int32_t* ids, const scalar_t* means2d,
                    const scalar_t* conics, const scalar_t* colors, const scalar_t* opac, int D_, const Consts& k,
                    const scalar_t* t_final, const int32_t* last, const scalar_t* v_out, const scalar_t* v_T,
                    scalar_t* pair_grad) {
  const int D = DC > 0 ? DC : D_;
  const int64_t n_tiles = g.C * g.tiles();
  const int R = kRowFixed + D;
  const scalar_t amin = static_cast<scalar_t>(k.alpha_min), amax = static_cast<scalar_t>(k.alpha_max);
  const std::vector<Entry<scalar_t>> packed = pack_entries(g, means2d, conics, opac, k.alpha_min);
#pragma omp parallel num_threads(g.threads)
  {
    TileList<scalar_t> L;
    std::vector<std::vector<int32_t>> lists;
    std::vector<scalar_t> later(D);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < n_tiles; ++t) {
      const int64_t K = toff[t + 1] - toff[t];
      if (K == 0) continue;
      const TileFrame f = tile_frame(g, t);
      L.gather(ids + toff[t], K, D, packed.data(), colors);
      block_lists(L, f, lists);
      scalar_t* rows = pair_grad + toff[t] * R;
      for (int y = f.y0; y < f.y0 + f.h; ++y) {
        for (int x = f.x0; x < f.x0 + f.w; ++x) {
          const int64_t p = (static_cast<int64_t>(f.cam) * g.height + y) * g.width + x;
          const int32_t n_used = last[p];
          if (n_used == 0) continue;
          const std::vector<int32_t>& list = lists[f.block_of(x, y)];
          // entries before position n_used, walked back to front
          const int64_t end = std::lower_bound(list.begin(), list.end(), n_used) - list.begin();
          const scalar_t px = static_cast<scalar_t>(x) + static_cast<scalar_t>(0.5);
          const scalar_t py = static_cast<scalar_t>(y) + static_cast<scalar_t>(0.5);
          const scalar_t* vo = v_out + p * D;
          const scalar_t tv = t_final[p] * v_T[p];  // T_final * dL/dT_final
          std::fill(later.begin(), later.end(), scalar_t(0));  // colour composited behind the entry
          scalar_t T = t_final[p];
          for (int64_t j = end - 1; j >= 0; --j) {
            const int32_t i = list[j];
            const Entry<scalar_t>& E = L.e[i];
            scalar_t dx, dy, raw, alpha;
            if (!entry_alpha(E, px, py, amin, amax, dx, dy, raw, alpha)) continue;
            const scalar_t ra = 1 / (1 - alpha);
            T *= ra;  // transmittance in front of entry i
            const scalar_t w = alpha * T;
            const scalar_t* ci = &L.col[static_cast<int64_t>(i) * D];
            scalar_t* row = rows + static_cast<int64_t>(i) * R;
            scalar_t v_alpha = 0;
            for (int d = 0; d < D; ++d) {
              row[kRowFixed + d] += w * vo[d];
              v_alpha += (ci[d] * T - later[d] * ra) * vo[d];
              later[d] += w * ci[d];
            }
            v_alpha -= tv * ra;
            if (raw <= amax) {  // clamped alphas pass no gradient
              const scalar_t vis = raw / E.op;
              const scalar_t v_sigma = -raw * v_alpha;
              const scalar_t gx = v_sigma * (E.a * dx + E.b * dy);
              const scalar_t gy = v_sigma * (E.b * dx + E.c * dy);
              row[0] += gx;
              row[1] += gy;
              row[2] += static_cast<scalar_t>(0.5) * v_sigma * dx * dx;
              row[3] += v_sigma * dx * dy;
              row[4] += static_cast<scalar_t>(0.5) * v_sigma * dy * dy;
              row[5] += vis * v_alpha;
              row[6] += std::abs(gx);
              row[7] += std::abs(gy);
            }
          }
        }
      }
    }
  }
}

#if GVR_SSE2
inline float hsum4(__m128 v) {  // ((v0 + v1) + (v2 + v3)): a fixed order
  const __m128 s = _mm_add_ps(v, _mm_shuffle_ps(v, v, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehl_ps(s, s)));
}

// The float backward with SSE2: each block's 16 pixels walk the block list back to front in
// lockstep, from every pixel's own last consumed entry (masked per lane), recomputing the forward's
// alphas bit for bit (the same sigma and fast_exp4). Per entry, the lanes' gradients are summed in a
// fixed order and added to the entry's pair row.
template <int DC>
void backward_tiles_sse(const Geometry& g, const int64_t* toff, const int32_t* ids, const float* means2d,
                        const float* conics, const float* colors, const float* opac, int D_, const Consts& k,
                        const float* t_final, const int32_t* last, const float* v_out, const float* v_T,
                        float* pair_grad) {
  const int D = DC > 0 ? DC : D_;
  const int64_t n_tiles = g.C * g.tiles();
  const int R = kRowFixed + D;
  const __m128 amin = _mm_set1_ps(static_cast<float>(k.alpha_min));
  const __m128 amax = _mm_set1_ps(static_cast<float>(k.alpha_max));
  const __m128 half = _mm_set1_ps(0.5f), one = _mm_set1_ps(1.0f), sign = _mm_set1_ps(-0.0f);
  const std::vector<Entry<float>> packed = pack_entries(g, means2d, conics, opac, k.alpha_min);
#pragma omp parallel num_threads(g.threads)
  {
    TileList<float> L;
    std::vector<std::vector<int32_t>> lists;
    // per block: [D][row][lane] d loss / d colour and colour behind; [R][lane] this entry's sums
    std::vector<float> buf(static_cast<size_t>(2 * D) * kBlock * kBlock + static_cast<size_t>(R) * 4);
    float* vo = buf.data();
    float* later = vo + D * kBlock * kBlock;
    float* gs = later + D * kBlock * kBlock;
    alignas(16) float lane_f[4];
    alignas(16) int32_t lane_i[4];
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < n_tiles; ++t) {
      const int64_t K = toff[t + 1] - toff[t];
      if (K == 0) continue;
      const TileFrame f = tile_frame(g, t);
      L.gather(ids + toff[t], K, D, packed.data(), colors);
      block_lists(L, f, lists);
      float* rows_out = pair_grad + toff[t] * R;
      for (int by = 0; by < f.nby; ++by) {
        for (int bx = 0; bx < f.nbx; ++bx) {
          const int x0 = f.x0 + bx * kBlock, y0 = f.y0 + by * kBlock;
          const int w = std::min(kBlock, f.x0 + f.w - x0), h = std::min(kBlock, f.y0 + f.h - y0);
          const __m128 px = _mm_add_ps(_mm_set_ps(x0 + 3.0f, x0 + 2.0f, x0 + 1.0f, x0 + 0.0f), half);
          __m128 py[4], T[4], tv[4];
          __m128i n_used[4];
          int max_used = 0;
          std::fill(vo, vo + 2 * D * kBlock * kBlock, 0.0f);  // vo and later
          for (int r = 0; r < 4; ++r) {
            py[r] = _mm_set1_ps(static_cast<float>(y0 + r) + 0.5f);
            for (int q = 0; q < 4; ++q) {
              lane_f[q] = 1.0f;
              lane_i[q] = 0;
            }
            float tvl[4] = {0, 0, 0, 0};
            if (r < h) {
              const int64_t row = (static_cast<int64_t>(f.cam) * g.height + y0 + r) * g.width + x0;
              for (int q = 0; q < w; ++q) {
                lane_f[q] = t_final[row + q];
                lane_i[q] = last[row + q];
                tvl[q] = t_final[row + q] * v_T[row + q];  // T_final * dL/dT_final
                max_used = std::max(max_used, lane_i[q]);
                for (int d = 0; d < D; ++d) vo[(d * 4 + r) * 4 + q] = v_out[(row + q) * D + d];
              }
            }
            T[r] = _mm_load_ps(lane_f);
            n_used[r] = _mm_load_si128(reinterpret_cast<const __m128i*>(lane_i));
            tv[r] = _mm_loadu_ps(tvl);
          }
          if (max_used == 0) continue;
          const std::vector<int32_t>& list = lists[by * f.nbx + bx];
          const int64_t end = std::lower_bound(list.begin(), list.end(), max_used) - list.begin();
          for (int64_t j = end - 1; j >= 0; --j) {  // back to front
            const int32_t i = list[j];
            const Entry<float>& E = L.e[i];
            const float* ci = &L.col[static_cast<int64_t>(i) * D];
            const __m128 dx = _mm_sub_ps(_mm_set1_ps(E.mx), px);
            const __m128 a = _mm_set1_ps(E.a), b = _mm_set1_ps(E.b), c = _mm_set1_ps(E.c);
            const __m128 adxdx = _mm_mul_ps(_mm_mul_ps(a, dx), dx), bdx = _mm_mul_ps(b, dx);
            const __m128 inv_op = _mm_set1_ps(1.0f / E.op);
            const __m128i id = _mm_set1_epi32(i);
            __m128 s[kRowFixed];
            for (auto& v : s) v = _mm_setzero_ps();
            std::fill(gs + kRowFixed * 4, gs + R * 4, 0.0f);
            bool any = false;
            for (int r = 0; r < 4; ++r) {
              const __m128 dy = _mm_sub_ps(_mm_set1_ps(E.my), py[r]);
              const __m128 sigma = _mm_add_ps(_mm_mul_ps(half, _mm_add_ps(adxdx, _mm_mul_ps(_mm_mul_ps(c, dy), dy))),
                                              _mm_mul_ps(bdx, dy));
              const __m128 raw = _mm_mul_ps(_mm_set1_ps(E.op), fast_exp4(_mm_xor_ps(sigma, sign)));
              const __m128 active = _mm_castsi128_ps(_mm_cmpgt_epi32(n_used[r], id));  // i < n_used
              const __m128 ok = _mm_and_ps(_mm_and_ps(_mm_cmple_ps(sigma, _mm_set1_ps(E.skip)),
                                                      _mm_cmpge_ps(raw, amin)), active);
              if (_mm_movemask_ps(ok) == 0) continue;
              any = true;
              const __m128 alpha = _mm_and_ps(ok, _mm_min_ps(raw, amax));
              const __m128 ra = _mm_div_ps(one, _mm_sub_ps(one, alpha));  // 1 where skipped
              T[r] = _mm_mul_ps(T[r], ra);                                // transmittance in front of entry i
              const __m128 wgt = _mm_mul_ps(alpha, T[r]);
              __m128 v_alpha = _mm_sub_ps(_mm_setzero_ps(), _mm_mul_ps(tv[r], ra));
              for (int d = 0; d < D; ++d) {
                float* ld = later + (d * 4 + r) * 4;
                const __m128 vd = _mm_loadu_ps(vo + (d * 4 + r) * 4);
                const __m128 cd = _mm_set1_ps(ci[d]);
                const __m128 lat = _mm_loadu_ps(ld);
                float* gd = gs + (kRowFixed + d) * 4;
                _mm_storeu_ps(gd, _mm_add_ps(_mm_loadu_ps(gd), _mm_mul_ps(wgt, vd)));
                v_alpha = _mm_add_ps(v_alpha, _mm_mul_ps(_mm_sub_ps(_mm_mul_ps(cd, T[r]), _mm_mul_ps(lat, ra)), vd));
                _mm_storeu_ps(ld, _mm_add_ps(lat, _mm_mul_ps(wgt, cd)));
              }
              const __m128 free = _mm_and_ps(ok, _mm_cmple_ps(raw, amax));  // clamped alphas pass no gradient
              const __m128 v_sigma = _mm_and_ps(free, _mm_xor_ps(_mm_mul_ps(raw, v_alpha), sign));
              const __m128 gx = _mm_mul_ps(v_sigma, _mm_add_ps(_mm_mul_ps(a, dx), _mm_mul_ps(b, dy)));
              const __m128 gy = _mm_mul_ps(v_sigma, _mm_add_ps(bdx, _mm_mul_ps(c, dy)));
              const __m128 hv = _mm_mul_ps(half, v_sigma);
              s[0] = _mm_add_ps(s[0], gx);
              s[1] = _mm_add_ps(s[1], gy);
              s[2] = _mm_add_ps(s[2], _mm_mul_ps(_mm_mul_ps(hv, dx), dx));
              s[3] = _mm_add_ps(s[3], _mm_mul_ps(_mm_mul_ps(v_sigma, dx), dy));
              s[4] = _mm_add_ps(s[4], _mm_mul_ps(_mm_mul_ps(hv, dy), dy));
              s[5] = _mm_add_ps(s[5], _mm_and_ps(free, _mm_mul_ps(_mm_mul_ps(raw, inv_op), v_alpha)));
              s[6] = _mm_add_ps(s[6], _mm_andnot_ps(sign, gx));
              s[7] = _mm_add_ps(s[7], _mm_andnot_ps(sign, gy));
            }
            if (!any) continue;
            float* row = rows_out + static_cast<int64_t>(i) * R;
            for (int q = 0; q < kRowFixed; ++q) row[q] += hsum4(s[q]);
            for (int d = 0; d < D; ++d) row[kRowFixed + d] += hsum4(_mm_loadu_ps(gs + (kRowFixed + d) * 4));
          }
        }
      }
    }
  }
}

#endif  // GVR_SSE2

// out[f] = sum of the pair rows of Gaussian f, always in the same order (thread-count independent).
template <typename scalar_t>
void sum_pair_rows(const scalar_t* pair_grad, const int64_t* goff, const int32_t* slot, int64_t CN, int R,
                   scalar_t* out, int threads) {
#pragma omp parallel for schedule(dynamic, 1024) num_threads(threads)
  for (int64_t f = 0; f < CN; ++f) {
    scalar_t* o = out + f * R;
    for (int r = 0; r < R; ++r) o[r] = 0;
    for (int64_t j = goff[f]; j < goff[f + 1]; ++j) {
      const scalar_t* row = pair_grad + static_cast<int64_t>(slot[j]) * R;
      for (int r = 0; r < R; ++r) o[r] += row[r];
    }
  }
}

// ---- Spherical harmonics (gsplat / 3DGS real basis and sign convention, degrees 0..3) ----
// colour = sum_k basis_k(u) coeff_k with u = dir / |dir|; the backward gives d/dcoeff and d/ddir.

constexpr double kC0 = 0.28209479177387814, kC1 = 0.4886025119029199;
constexpr double kC2[5] = {1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792,
                           0.5462742152960396};
constexpr double kC3[7] = {-0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154,
                           -0.4570457994644658, 1.445305721320277, -0.5900435899266435};

// basis[k] and, when grad is given, d basis[k] / d(x, y, z) for a unit direction.
template <typename T>
inline void sh_basis(int degree, T x, T y, T z, T* basis, T (*grad)[3]) {
  basis[0] = T(kC0);
  if (grad) grad[0][0] = grad[0][1] = grad[0][2] = 0;
  if (degree < 1) return;
  basis[1] = T(-kC1) * y;
  basis[2] = T(kC1) * z;
  basis[3] = T(-kC1) * x;
  if (grad) {
    const T g1[3][3] = {{0, T(-kC1), 0}, {0, 0, T(kC1)}, {T(-kC1), 0, 0}};
    for (int k = 0; k < 3; ++k)
      for (int j = 0; j < 3; ++j) grad[1 + k][j] = g1[k][j];
  }
  if (degree < 2) return;
  const T xx = x * x, yy = y * y, zz = z * z;
  basis[4] = T(kC2[0]) * x * y;
  basis[5] = T(kC2[1]) * y * z;
  basis[6] = T(kC2[2]) * (2 * zz - xx - yy);
  basis[7] = T(kC2[3]) * x * z;
  basis[8] = T(kC2[4]) * (xx - yy);
  if (grad) {
    const T g2[5][3] = {{y, x, 0}, {0, z, y}, {-2 * x, -2 * y, 4 * z}, {z, 0, x}, {2 * x, -2 * y, 0}};
    for (int k = 0; k < 5; ++k)
      for (int j = 0; j < 3; ++j) grad[4 + k][j] = T(kC2[k]) * g2[k][j];
  }
  if (degree < 3) return;
  basis[9] = T(kC3[0]) * y * (3 * xx - yy);
  basis[10] = T(kC3[1]) * x * y * z;
  basis[11] = T(kC3[2]) * y * (4 * zz - xx - yy);
  basis[12] = T(kC3[3]) * z * (2 * zz - 3 * xx - 3 * yy);
  basis[13] = T(kC3[4]) * x * (4 * zz - xx - yy);
  basis[14] = T(kC3[5]) * z * (xx - yy);
  basis[15] = T(kC3[6]) * x * (xx - 3 * yy);
  if (grad) {
    const T g3[7][3] = {{6 * x * y, 3 * xx - 3 * yy, 0},
                        {y * z, x * z, x * y},
                        {-2 * x * y, 4 * zz - xx - 3 * yy, 8 * y * z},
                        {-6 * x * z, -6 * y * z, 6 * zz - 3 * xx - 3 * yy},
                        {4 * zz - 3 * xx - yy, -2 * x * y, 8 * x * z},
                        {2 * x * z, -2 * y * z, xx - yy},
                        {3 * xx - 3 * yy, -6 * x * y, 0}};
    for (int k = 0; k < 7; ++k)
      for (int j = 0; j < 3; ++j) grad[9 + k][j] = T(kC3[k]) * g3[k][j];
  }
}

// dirs [C,N,3]; coeffs [N,K,3] (shared by the cameras) or [C,N,K,3]; out [C,N,3].
template <typename T>
void sh_forward(int C, int N, int K, int degree, bool shared, const T* dirs, const T* coeffs, T* out, int threads) {
  const int nb = (degree + 1) * (degree + 1);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t m = 0; m < static_cast<int64_t>(C) * N; ++m) {
    const T* d = dirs + 3 * m;
    const T norm = std::sqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2]);
    const T inv = T(1) / std::max(norm, T(1e-12));  // F.normalize's eps
    T basis[16];
    sh_basis<T>(degree, d[0] * inv, d[1] * inv, d[2] * inv, basis, nullptr);
    const T* cf = coeffs + (shared ? m % N : m) * K * 3;
    T r = 0, g = 0, b = 0;
    for (int k = 0; k < nb; ++k) {
      r += basis[k] * cf[3 * k];
      g += basis[k] * cf[3 * k + 1];
      b += basis[k] * cf[3 * k + 2];
    }
    out[3 * m] = r;
    out[3 * m + 1] = g;
    out[3 * m + 2] = b;
  }
}

// v_out [C,N,3] -> v_coeffs (shaped as coeffs, summed over cameras when shared), v_dirs [C,N,3].
template <typename T>
void sh_backward(int C, int N, int K, int degree, bool shared, const T* dirs, const T* coeffs, const T* v_out,
                 T* v_coeffs, T* v_dirs, int threads) {
  const int nb = (degree + 1) * (degree + 1);
  const int64_t rows = shared ? N : static_cast<int64_t>(C) * N;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t row = 0; row < rows; ++row) {
    T* vc = v_coeffs + row * K * 3;
    for (int i = 0; i < K * 3; ++i) vc[i] = 0;
    for (int c = 0; c < (shared ? C : 1); ++c) {  // a shared row gathers every camera, in order
      const int64_t m = shared ? static_cast<int64_t>(c) * N + row : row;
      const T* d = dirs + 3 * m;
      const T* vo = v_out + 3 * m;
      const T* cf = coeffs + row * K * 3;
      const T norm = std::sqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2]);
      const T inv = T(1) / std::max(norm, T(1e-12));
      const T u[3] = {d[0] * inv, d[1] * inv, d[2] * inv};
      T basis[16], grad[16][3];
      sh_basis<T>(degree, u[0], u[1], u[2], basis, grad);
      T vu[3] = {0, 0, 0};
      for (int k = 0; k < nb; ++k) {
        vc[3 * k] += basis[k] * vo[0];
        vc[3 * k + 1] += basis[k] * vo[1];
        vc[3 * k + 2] += basis[k] * vo[2];
        const T dot = cf[3 * k] * vo[0] + cf[3 * k + 1] * vo[1] + cf[3 * k + 2] * vo[2];
        for (int j = 0; j < 3; ++j) vu[j] += dot * grad[k][j];
      }
      // through u = d / |d| (no gradient where the norm was clamped, as F.normalize)
      T* vd = v_dirs + 3 * m;
      if (norm > T(1e-12)) {
        const T uv = u[0] * vu[0] + u[1] * vu[1] + u[2] * vu[2];
        for (int j = 0; j < 3; ++j) vd[j] = (vu[j] - u[j] * uv) * inv;
      } else {
        for (int j = 0; j < 3; ++j) vd[j] = vu[j] * inv;
      }
    }
  }
}

}  // namespace

// ---- C interface (called through ctypes by gvae_ns/render/compiled.py) ----
// `dbl` selects float64 (1) or float32 (0) for every floating-point array.  All arrays are dense,
// row-major, and allocated by the caller; returns 0 on success, 1 when memory ran out.
// Shapes: means2d [C,N,2], conics [C,N,3], colors [C,N,D], opac/depths/radii [C,N],
// images [C,H,W,D], per-pixel arrays [C,H,W].

#define GVR_DISPATCH(...)                                \
  try {                                                  \
    if (dbl) {                                           \
      using scalar_t = double;                           \
      __VA_ARGS__;                                       \
    } else {                                             \
      using scalar_t = float;                            \
      __VA_ARGS__;                                       \
    }                                                    \
  } catch (const std::bad_alloc&) {                      \
    return 1;                                            \
  }                                                      \
  return 0;

// Runs the statement with DC bound to D when D is 1, 3 or 4 (unrolled channel loops), else to 0.
#define WITH_CHANNELS(D, ...)          \
  switch (D) {                          \
    case 1: {                           \
      constexpr int DC = 1;             \
      __VA_ARGS__;                      \
    } break;                            \
    case 3: {                           \
      constexpr int DC = 3;             \
      __VA_ARGS__;                      \
    } break;                            \
    case 4: {                           \
      constexpr int DC = 4;             \
      __VA_ARGS__;                      \
    } break;                            \
    default: {                          \
      constexpr int DC = 0;             \
      __VA_ARGS__;                      \
    }                                   \
  }

#define GVR_GEOMETRY Geometry g{C, N, W, H, ts, (W + ts - 1) / ts, (H + ts - 1) / ts, threads > 0 ? threads : 1}
#define F(p) static_cast<const scalar_t*>(p)

extern "C" {

int gvr_abi_version() { return 1; }

// Pairs per Gaussian into goff [C*N + 1] (prefix-summed); *n_pairs = their total.
int gvr_count_pairs(int dbl, int C, int N, int W, int H, int ts, int threads, const void* means2d,
                    const void* conics, const void* opac, const int32_t* radii, double alpha_min, int64_t* goff,
                    int64_t* n_pairs) {
  GVR_GEOMETRY;
  GVR_DISPATCH(*n_pairs = count_pairs<scalar_t>(g, F(means2d), F(conics), F(opac), radii, alpha_min, goff))
}

// Tile lists: toff [C*tiles + 1], ids [P], slot [P] (see fill_bins).
int gvr_fill_bins(int dbl, int C, int N, int W, int H, int ts, int threads, const void* means2d, const void* conics,
                  const void* opac, const int32_t* radii, const void* depths, double alpha_min, const int64_t* goff,
                  int64_t* toff, int32_t* ids, int32_t* slot) {
  GVR_GEOMETRY;
  GVR_DISPATCH(fill_bins<scalar_t>(g, F(means2d), F(conics), F(opac), radii, F(depths), alpha_min, goff, toff, ids,
                                   slot))
}

// Front-to-back compositing: out [C,H,W,D] (no background), t_final and last [C,H,W].
int gvr_forward(int dbl, int C, int N, int W, int H, int ts, int threads, int D, const void* means2d,
                const void* conics, const void* colors, const void* opac, const int64_t* toff, const int32_t* ids,
                double alpha_min, double alpha_max, double t_min, void* out, void* t_final, int32_t* last) {
  GVR_GEOMETRY;
  const Consts k{alpha_min, alpha_max, t_min};
#if GVR_SSE2
  if (!dbl) {  // float: the SSE2 lockstep walk (bit-identical to forward_tiles<float>)
    try {
      using scalar_t = float;
      WITH_CHANNELS(D, forward_tiles_sse<DC>(g, toff, ids, F(means2d), F(conics), F(colors), F(opac), D, k,
                                              static_cast<float*>(out), static_cast<float*>(t_final), last))
    } catch (const std::bad_alloc&) {
      return 1;
    }
    return 0;
  }
#endif
  GVR_DISPATCH(WITH_CHANNELS(D, forward_tiles<scalar_t, DC>(g, toff, ids, F(means2d), F(conics), F(colors),
                                                             F(opac), D, k, static_cast<scalar_t*>(out),
                                                             static_cast<scalar_t*>(t_final), last)))
}

// Back-to-front gradients.  v_out [C,H,W,D], v_T [C,H,W] (d loss / d final transmittance);
// pair_grad [P, 8 + D] zero-filled scratch; grad [C*N, 8 + D] receives per Gaussian
// (v_mean x, y, v_conic a, b, c, v_opacity, |v_mean| x, y, v_color[D]).
int gvr_backward(int dbl, int C, int N, int W, int H, int ts, int threads, int D, const void* means2d,
                 const void* conics, const void* colors, const void* opac, const int64_t* toff, const int32_t* ids,
                 const int64_t* goff, const int32_t* slot, double alpha_min, double alpha_max, double t_min,
                 const void* t_final, const int32_t* last, const void* v_out, const void* v_T, void* pair_grad,
                 void* grad) {
  GVR_GEOMETRY;
  const Consts k{alpha_min, alpha_max, t_min};
#if GVR_SSE2
  if (!dbl) {  // float: the SSE2 lockstep walk
    try {
      using scalar_t = float;
      WITH_CHANNELS(D, backward_tiles_sse<DC>(g, toff, ids, F(means2d), F(conics), F(colors), F(opac), D, k,
                                               F(t_final), last, F(v_out), F(v_T), static_cast<float*>(pair_grad)));
      sum_pair_rows<float>(static_cast<const float*>(pair_grad), goff, slot, static_cast<int64_t>(C) * N,
                           kRowFixed + D, static_cast<float*>(grad), g.threads);
    } catch (const std::bad_alloc&) {
      return 1;
    }
    return 0;
  }
#endif
  GVR_DISPATCH(WITH_CHANNELS(D, backward_tiles<scalar_t, DC>(g, toff, ids, F(means2d), F(conics), F(colors),
                                                              F(opac), D, k, F(t_final), last, F(v_out), F(v_T),
                                                              static_cast<scalar_t*>(pair_grad)));
               sum_pair_rows<scalar_t>(static_cast<const scalar_t*>(pair_grad), goff, slot,
                                       static_cast<int64_t>(C) * N, kRowFixed + D, static_cast<scalar_t*>(grad), g.threads))
}

// SH colours (see sh_forward / sh_backward): shared = 1 when coeffs is [N,K,3] for every camera.
int gvr_sh_forward(int dbl, int C, int N, int K, int degree, int shared, int threads, const void* dirs,
                   const void* coeffs, void* out) {
  GVR_DISPATCH(sh_forward<scalar_t>(C, N, K, degree, shared != 0, F(dirs), F(coeffs), static_cast<scalar_t*>(out),
                                    threads > 0 ? threads : 1))
}

int gvr_sh_backward(int dbl, int C, int N, int K, int degree, int shared, int threads, const void* dirs,
                    const void* coeffs, const void* v_out, void* v_coeffs, void* v_dirs) {
  GVR_DISPATCH(sh_backward<scalar_t>(C, N, K, degree, shared != 0, F(dirs), F(coeffs), F(v_out),
                                     static_cast<scalar_t*>(v_coeffs), static_cast<scalar_t*>(v_dirs),
                                     threads > 0 ? threads : 1))
}

}  // extern "C"
