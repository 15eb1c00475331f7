// The only file that knows about pybind11 and NumPy: checks the arrays, fills AttentionParams, runs
// the kernel without the GIL. It never converts or copies; fastattn/api.py has already validated
// and broadcast the arguments, the checks here keep the kernel memory-safe whatever the caller.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

#include "cpu/dispatch.h"
#include "params.h"

namespace py = pybind11;

namespace fastattn {
namespace {

[[noreturn]] void fail(const std::string& message) { throw py::value_error(message); }

// AttentionParams::interrupted: runs the Python signal handlers (Ctrl-C's raises KeyboardInterrupt)
// on the calling thread, which the kernel asks between work items; a raised exception stays set for
// attention_forward_py to throw once the kernel has stopped.
bool python_signal_raised(void* raised) {
  py::gil_scoped_acquire gil;
  if (PyErr_CheckSignals() == 0) return false;
  *static_cast<bool*>(raised) = true;
  return true;
}

Strides strides_of(const py::array& a, const char* name) {
  const auto ndim = a.ndim();
  const auto itemsize = a.itemsize();
  if (reinterpret_cast<std::uintptr_t>(a.data()) % itemsize != 0)
    fail(std::string(name) + " is not aligned to its element size; pass an aligned array");
  Strides s{};
  for (py::ssize_t d = 0; d < ndim; ++d) {
    if (a.strides(d) % itemsize != 0)
      fail(std::string(name) + " has a stride that is not a multiple of its element size");
  }
  for (py::ssize_t d = 0; d < ndim - 3; ++d) s.batch[d] = a.strides(d) / itemsize;
  s.head = a.strides(ndim - 3) / itemsize;
  s.row = a.strides(ndim - 2) / itemsize;
  s.col = a.strides(ndim - 1) / itemsize;
  return s;
}

void check_shape(const py::array& a, const char* name, const py::array& q, int64_t heads, int64_t rows,
                 int64_t cols) {
  const auto ndim = q.ndim();
  if (a.ndim() != ndim) fail(std::string(name) + " must have as many dims as q");
  for (py::ssize_t d = 0; d < ndim - 3; ++d)
    if (a.shape(d) != q.shape(d)) fail(std::string(name) + " batch dims must equal q's");
  if (a.shape(ndim - 3) != heads || a.shape(ndim - 2) != rows || a.shape(ndim - 1) != cols)
    fail(std::string(name) + " has the wrong head, row or column count");
}

// An array of the batch dims followed by `tail` (heads, then rows), e.g. ALiBi slopes [batch..., Hq]:
// checks its shape against q's and returns its element strides (tail dims in .head, then .row).
Strides tail_strides(const py::array& a, const char* name, const py::array& q, std::initializer_list<int64_t> tail) {
  const auto batch_ndim = q.ndim() - 3;
  if (a.ndim() != batch_ndim + static_cast<py::ssize_t>(tail.size()))
    fail(std::string(name) + " must have q's batch dims followed by " + std::to_string(tail.size()) + " dims");
  for (py::ssize_t d = 0; d < batch_ndim; ++d)
    if (a.shape(d) != q.shape(d)) fail(std::string(name) + " batch dims must equal q's");
  py::ssize_t d = batch_ndim;
  for (const int64_t size : tail)
    if (a.shape(d++) != size) fail(std::string(name) + " has the wrong head or row count");
  const auto itemsize = a.itemsize();
  if (reinterpret_cast<std::uintptr_t>(a.data()) % itemsize != 0)
    fail(std::string(name) + " is not aligned to its element size");
  Strides s{};
  int64_t* tail_stride[] = {&s.head, &s.row};
  for (d = 0; d < a.ndim(); ++d) {
    if (a.strides(d) % itemsize != 0) fail(std::string(name) + " has a stride that is not a multiple of its element size");
    (d < batch_ndim ? s.batch[d] : *tail_stride[d - batch_ndim]) = a.strides(d) / itemsize;
  }
  return s;
}

py::array as_array(const py::object& x, const char* name) {
  if (!py::isinstance<py::array>(x)) throw py::type_error(std::string(name) + " must be a NumPy array or None");
  return py::reinterpret_borrow<py::array>(x);
}

// Dtypes compare by value (a dtype that went through pickle is another object); bfloat16 is
// ml_dtypes' NumPy type, known by its name (this module does not depend on ml_dtypes).
DType dtype_of(const py::array& a, const char* name) {
  const py::dtype dtype = a.dtype();
  if (dtype.equal(py::dtype::of<float>())) return DType::float32;
  if (dtype.equal(py::dtype::of<double>())) return DType::float64;
  if (dtype.equal(py::dtype("float16"))) return DType::float16;
  if (dtype.itemsize() == 2 && py::str(dtype.attr("name")).cast<std::string>() == "bfloat16") return DType::bfloat16;
  throw py::type_error(std::string(name) + " must be float32, float64, float16 or bfloat16");
}

// q [batch..., Hq, L, E], k [batch..., Hk, S, E], v [batch..., Hv, S, Ev], out [batch..., Hq, L, Ev],
// mask None or [batch..., Hq, L, S] (bool, float32 or float64; zero strides for broadcast dims).
// window sides < 0 are unbounded; causal caps the right side at 0. alibi_slopes None or float64
// [batch..., Hq]; kv_lengths None or int64 [batch...], each in [0, S]; lse None or [batch..., Hq, L]
// of the compute dtype (out's, float32 for half precision).
void attention_forward_py(const py::array& q, const py::array& k, const py::array& v, py::array& out,
                          const py::object& mask, double scale, bool causal, int num_threads,
                          bool align_bottom_right, int64_t window_left, int64_t window_right, double softcap,
                          const py::object& alibi_slopes, const py::object& kv_lengths, const py::object& lse) {
  const auto ndim = q.ndim();
  if (ndim < 3 || ndim > 3 + kMaxBatchDims)
    fail("q must have between 3 and " + std::to_string(3 + kMaxBatchDims) + " dims");
  AttentionParams p{};
  p.dtype = dtype_of(q, "q");
  for (const auto* a : {&k, &v, static_cast<const py::array*>(&out)})
    if (dtype_of(*a, "k, v and out") != p.dtype) throw py::type_error("q, k, v and out must share a dtype");
  if (!out.writeable()) fail("out must be writeable");
  for (const auto& [a, name] : {std::pair{&k, "k"}, {&v, "v"}, {static_cast<const py::array*>(&out), "out"}})
    if (a->ndim() != ndim) fail(std::string(name) + " must have as many dims as q");

  p.batch_ndim = static_cast<int32_t>(ndim - 3);
  for (int d = 0; d < p.batch_ndim; ++d) p.batch_shape[d] = q.shape(d);
  p.num_heads_q = q.shape(ndim - 3);
  p.seqlen_q = q.shape(ndim - 2);
  p.head_dim = q.shape(ndim - 1);
  p.num_heads_k = k.shape(ndim - 3);
  p.seqlen_k = k.shape(ndim - 2);
  p.num_heads_v = v.shape(ndim - 3);
  p.head_dim_v = v.shape(ndim - 1);
  if (p.num_heads_k == 0 || p.num_heads_v == 0 || p.num_heads_q % p.num_heads_k != 0 ||
      p.num_heads_q % p.num_heads_v != 0)
    fail("the query heads must be a multiple of the key and value heads");
  check_shape(k, "k", q, p.num_heads_k, p.seqlen_k, p.head_dim);
  check_shape(v, "v", q, p.num_heads_v, p.seqlen_k, p.head_dim_v);
  check_shape(out, "out", q, p.num_heads_q, p.seqlen_q, p.head_dim_v);

  p.q_ptr = q.data();
  p.k_ptr = k.data();
  p.v_ptr = v.data();
  p.out_ptr = out.mutable_data();
  p.q_strides = strides_of(q, "q");
  p.k_strides = strides_of(k, "k");
  p.v_strides = strides_of(v, "v");
  p.out_strides = strides_of(out, "out");

  p.mask_kind = MaskKind::none;
  if (!mask.is_none()) {
    const auto m = as_array(mask, "mask");
    check_shape(m, "mask", q, p.num_heads_q, p.seqlen_q, p.seqlen_k);
    if (m.dtype().equal(py::dtype::of<bool>())) {
      p.mask_kind = MaskKind::boolean;
    } else {
      p.mask_kind = MaskKind::additive;
      p.mask_dtype = dtype_of(m, "mask");
    }
    p.mask_ptr = m.data();
    p.mask_strides = strides_of(m, "mask");
  }

  p.scale = scale;
  p.align_bottom_right = align_bottom_right;
  p.window_left = window_left < 0 ? -1 : window_left;
  p.window_right = window_right < 0 ? -1 : window_right;
  if (causal) p.window_right = p.window_right < 0 ? 0 : std::min<int64_t>(p.window_right, 0);
  if (!(softcap >= 0)) fail("softcap must be positive (0 for none)");
  p.softcap = softcap;
  if (!alibi_slopes.is_none()) {
    const auto a = as_array(alibi_slopes, "alibi_slopes");
    if (!a.dtype().equal(py::dtype::of<double>())) throw py::type_error("alibi_slopes must be float64");
    p.alibi_strides = tail_strides(a, "alibi_slopes", q, {p.num_heads_q});
    p.alibi_slopes = static_cast<const double*>(a.data());
  }
  if (!kv_lengths.is_none()) {
    const auto a = as_array(kv_lengths, "kv_lengths");
    if (!a.dtype().equal(py::dtype::of<int64_t>())) throw py::type_error("kv_lengths must be int64");
    p.kv_lengths_strides = tail_strides(a, "kv_lengths", q, {});
    p.kv_lengths = static_cast<const int64_t*>(a.data());
    // Every length must lie in [0, S]: the kernels read keys below it.
    std::vector<int64_t> index(p.batch_ndim, 0);
    bool more = true;
    for (int d = 0; d < p.batch_ndim; ++d) more = more && p.batch_shape[d] > 0;
    while (more) {
      int64_t offset = 0;
      for (int d = 0; d < p.batch_ndim; ++d) offset += index[d] * p.kv_lengths_strides.batch[d];
      const int64_t length = p.kv_lengths[offset];
      if (length < 0 || length > p.seqlen_k) fail("kv_lengths must lie in [0, S]");
      more = false;
      for (int d = p.batch_ndim - 1; d >= 0 && !more; --d) {
        if (++index[d] < p.batch_shape[d]) more = true;
        else index[d] = 0;
      }
    }
  }
  if (!lse.is_none()) {
    auto a = as_array(lse, "lse");
    const DType compute = p.dtype == DType::float64 ? DType::float64 : DType::float32;
    if (dtype_of(a, "lse") != compute) throw py::type_error("lse must be float64 for float64 inputs, else float32");
    if (!a.writeable()) fail("lse must be writeable");
    p.lse_strides = tail_strides(a, "lse", q, {p.num_heads_q, p.seqlen_q});
    p.lse_ptr = a.mutable_data();
  }
  if (num_threads < 1) fail("num_threads must be at least 1");
  p.num_threads = num_threads;
  bool signal_raised = false;
  p.interrupted = python_signal_raised;
  p.interrupted_context = &signal_raised;

  {
    py::gil_scoped_release release;
    attention_forward(p);
  }
  if (signal_raised) throw py::error_already_set();
}

}  // namespace
}  // namespace fastattn

PYBIND11_MODULE(_core, m) {
  m.doc() = "fastattn's compiled kernels; use the functions in fastattn instead.";
  // noconvert: a list or a wrong dtype is an error here, never a silent copy.
  m.def("attention_forward", &fastattn::attention_forward_py, py::arg("q").noconvert(),
        py::arg("k").noconvert(), py::arg("v").noconvert(), py::arg("out").noconvert(), py::arg("mask"), py::arg("scale"), py::arg("causal"), py::arg("num_threads"),
        py::kw_only(), py::arg("align_bottom_right") = false, py::arg("window_left") = -1,
        py::arg("window_right") = -1, py::arg("softcap") = 0.0, py::arg("alibi_slopes") = py::none(),
        py::arg("kv_lengths") = py::none(), py::arg("lse") = py::none(),
        "Writes softmax(q k^T * scale + mask) v into out. Arguments must be validated by fastattn.api.");
  m.def("supported_isas", &fastattn::supported_isas, "Kernel ISAs this CPU can run, best last.");
  m.def("current_isa", &fastattn::current_isa, "The kernel ISA in use.");
  m.def("cpu_features", &fastattn::cpu_features, "(feature, present) pairs for the x86 features the kernels use.");
  m.def(
      "set_isa",
      [](const std::string& name) {
        if (!fastattn::set_isa(name)) {
          std::string choices;
          for (const auto& isa : fastattn::supported_isas()) choices += (choices.empty() ? "" : ", ") + isa;
          throw py::value_error("ISA '" + name + "' is unknown or not supported by this CPU; choose one of: " +
                                choices);
        }
      },
      py::arg("name"), "Selects the kernel ISA by name.");
}
