// Checks csrc/cuda/local.cu on the host (see run.sh): its three ops against a direct float64
// computation on random configurations.
#include <cstdio>
#include <random>
#define EMU_BLOCKS(b) ((b) > 5 ? 5 : (b))
#include "local_emu.cc"  // csrc/cuda/local.cu, its launch replaced by emu_launch (run.sh)

using jax_convnet::ConvParams;
using jax_convnet::Layout;
using jax_convnet::LocalGeometry;

template <typename T> float to_f(T v);
template <> float to_f(float v) { return v; }
template <> float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> T from_f(float v);
template <> float from_f(float v) { return v; }
template <> __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }

template <typename T>
double check(LocalOp op, const LocalGeometry& g, std::mt19937& rng) {
  const int64_t K = g.rows(), P = g.positions();
  const int64_t n_img = g.batch * g.channels * g.in_h * g.in_w;
  const int64_t n_hid = g.batch * g.filters * P;
  const int64_t n_w = P * K * g.filters;
  std::normal_distribution<float> nd;
  auto fill = [&](int64_t n) { std::vector<T> v(n); for (auto& x : v) x = from_f<T>(nd(rng)); return v; };
  std::vector<T> img = fill(n_img), hid = fill(n_hid), w = fill(n_w);
  auto I = [&](int64_t b, int64_t c, int64_t y, int64_t x) {
    return b * g.image.n + c * g.image.c + y * g.image.y + x * g.image.x; };
  auto H = [&](int64_t b, int64_t f, int64_t oy, int64_t ox) {
    return b * g.hidden.n + f * g.hidden.c + oy * g.hidden.y + ox * g.hidden.x; };
  std::vector<double> ref(op == LocalOp::kFilterActs ? n_hid : op == LocalOp::kImageActs ? n_img : n_w, 0.0);
  for (int64_t b = 0; b < g.batch; ++b)
    for (int64_t oy = 0; oy < g.out_h; ++oy)
      for (int64_t ox = 0; ox < g.out_w; ++ox)
        for (int64_t c = 0; c < g.channels; ++c)
          for (int64_t i = 0; i < g.filter_h; ++i)
            for (int64_t j = 0; j < g.filter_w; ++j) {
              const int64_t y = oy * g.stride_h - g.pad_top + i, x = ox * g.stride_w - g.pad_left + j;
              if (y < 0 || y >= g.in_h || x < 0 || x >= g.in_w) continue;
              const int64_t k = c * g.k_c + i * g.k_i + j * g.k_j;
              for (int64_t f = 0; f < g.filters; ++f) {
                const int64_t wi = ((oy * g.out_w + ox) * K + k) * g.filters + f;
                if (op == LocalOp::kFilterActs) ref[H(b, f, oy, ox)] += double(to_f(img[I(b, c, y, x)])) * to_f(w[wi]);
                else if (op == LocalOp::kImageActs) ref[I(b, c, y, x)] += double(to_f(hid[H(b, f, oy, ox)])) * to_f(w[wi]);
                else ref[wi] += double(to_f(img[I(b, c, y, x)])) * to_f(hid[H(b, f, oy, ox)]);
              }
            }
  std::vector<T> out(ref.size(), from_f<T>(NAN));
  const void* a = op == LocalOp::kImageActs ? (const void*)hid.data() : (const void*)img.data();
  const void* bb = op == LocalOp::kWeightActs ? (const void*)hid.data() : (const void*)w.data();
  run_typed<T>(nullptr, op, g, a, bb, out.data());
  double maxref = 1e-30, err = 0;
  for (size_t e = 0; e < ref.size(); ++e) maxref = std::max(maxref, std::abs(ref[e]));
  for (size_t e = 0; e < ref.size(); ++e) {
    const double d = std::abs(double(to_f(out[e])) - ref[e]);
    if (!(d <= err)) err = std::isnan(d) ? INFINITY : std::max(err, d);
  }
  return err / maxref;
}

int main() {
  std::mt19937 rng(1);
  auto ri = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  int failures = 0;
  for (int trial = 0; trial < 60; ++trial) {
    const Layout layout = trial % 2 ? Layout::kNHWC : Layout::kC01B;
    const int64_t fh = ri(1, 4), fw = ri(1, 4), sh = ri(1, 3), sw = ri(1, 3);
    const int64_t h = fh + ri(0, 5), w = fw + ri(0, 5);
    const bool big = trial % 4 == 0;
    const int64_t n = ri(1, big ? 70 : 5), c = ri(1, big ? 40 : 5), f = ri(1, big ? 70 : 5);
    const int64_t pt = ri(0, 2), pb = ri(0, 2), pl = ri(0, 2), pr = ri(0, 2);
    const int64_t oh = (h + pt + pb - fh) / sh + 1, ow = (w + pl + pr - fw) / sw + 1;
    if (h + pt + pb < fh || w + pl + pr < fw) continue;
    int64_t img_d[4], hid_d[4], w_d[6];
    if (layout == Layout::kC01B) {
      int64_t a[4] = {c, h, w, n}, b[4] = {f, oh, ow, n}, ww[6] = {oh, ow, c, fh, fw, f};
      std::copy(a, a + 4, img_d); std::copy(b, b + 4, hid_d); std::copy(ww, ww + 6, w_d);
    } else {
      int64_t a[4] = {n, h, w, c}, b[4] = {n, oh, ow, f}, ww[6] = {oh, ow, fh, fw, c, f};
      std::copy(a, a + 4, img_d); std::copy(b, b + 4, hid_d); std::copy(ww, ww + 6, w_d);
    }
    ConvParams p{layout, sh, sw, pt, pb, pl, pr, 0, jax_convnet::Precision::kHighest};
    LocalGeometry g;
    const std::string e = jax_convnet::make_local_geometry(p, img_d, w_d, hid_d, &g);
    if (!e.empty()) { std::printf("geometry error %s\n", e.c_str()); return 1; }
    for (LocalOp op : {LocalOp::kFilterActs, LocalOp::kImageActs, LocalOp::kWeightActs}) {
      const double err = trial % 3 == 2 ? check<__nv_bfloat16>(op, g, rng) : check<float>(op, g, rng);
      const double tol = trial % 3 == 2 ? 1e-2 : 1e-5;
      if (!(err <= tol)) {
        ++failures;
        std::printf("FAIL trial %d op %d err %g (n%ld c%ld f%ld h%ld w%ld fh%ld fw%ld s%ld,%ld)\n", trial, int(op), err,
                    n, c, f, h, w, fh, fw, sh, sw);
      }
    }
  }
  std::printf("%d failures\n", failures);
  return failures != 0;
}
