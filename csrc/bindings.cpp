// The only file that knows about pybind11 and NumPy: checks the arrays, fills AttentionParams, runs
// the kernel without the GIL. It never converts or copies; fastattn/api.py has already validated
// and broadcast the arguments, the checks here keep the kernel memory-safe whatever the caller.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>

#include "cpu/dispatch.h"
#include "params.h"

namespace py = pybind11;

namespace fastattn {
namespace {

[[noreturn]] void fail(const std::string& message) { throw py::value_error(message); }

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

DType dtype_of(const py::array& a, const char* name) {
  if (a.dtype().is(py::dtype::of<float>())) return DType::float32;
  if (a.dtype().is(py::dtype::of<double>())) return DType::float64;
  throw py::type_error(std::string(name) + " must be float32 or float64");
}

// q [batch..., Hq, L, E], k [batch..., Hk, S, E], v [batch..., Hv, S, Ev], out [batch..., Hq, L, Ev],
// mask None or [batch..., Hq, L, S] (bool, float32 or float64; zero strides for broadcast dims).
void attention_forward_py(const py::array& q, const py::array& k, const py::array& v, py::array& out,
                          const py::object& mask, double scale, bool causal, int num_threads) {
  const auto ndim = q.ndim();
  if (ndim < 3 || ndim > 3 + kMaxBatchDims)
    fail("q must have between 3 and " + std::to_string(3 + kMaxBatchDims) + " dims");
  AttentionParams p{};
  p.dtype = dtype_of(q, "q");
  for (const auto* a : {&k, &v, static_cast<const py::array*>(&out)})
    if (dtype_of(*a, "k, v and out") != p.dtype) throw py::type_error("q, k, v and out must share a dtype");
  if (!out.writeable()) fail("out must be writeable");

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
    if (!py::isinstance<py::array>(mask)) throw py::type_error("mask must be a NumPy array");
    auto m = py::reinterpret_borrow<py::array>(mask);
    check_shape(m, "mask", q, p.num_heads_q, p.seqlen_q, p.seqlen_k);
    if (m.dtype().is(py::dtype::of<bool>())) {
      p.mask_kind = MaskKind::boolean;
    } else {
      p.mask_kind = MaskKind::additive;
      p.mask_dtype = dtype_of(m, "mask");
    }
    p.mask_ptr = m.data();
    p.mask_strides = strides_of(m, "mask");
  }

  p.scale = scale;
  p.causal = causal;
  if (num_threads < 1) fail("num_threads must be at least 1");
  p.num_threads = num_threads;

  py::gil_scoped_release release;
  attention_forward(p);
}

}  // namespace
}  // namespace fastattn

PYBIND11_MODULE(_core, m) {
  m.doc() = "fastattn's compiled kernels; use the functions in fastattn instead.";
  // noconvert: a list or a wrong dtype is an error here, never a silent copy.
  m.def("attention_forward", &fastattn::attention_forward_py, py::arg("q").noconvert(),
        py::arg("k").noconvert(), py::arg("v").noconvert(), py::arg("out").noconvert(), py::arg("mask"), py::arg("scale"), py::arg("causal"), py::arg("num_threads"),
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
