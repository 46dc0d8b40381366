// Python bindings of the fused CPU kernels (reverse KL, the divergence family and the sparse teacher), built just-in-time
// by minillm_kernels/_build.py. <torch/python.h> (pybind11 and its tensor casters) rather than <torch/extension.h>, which
// adds the whole C++ frontend (torch/all.h) and doubles this unit's compile time.
#include <torch/python.h>

#include "divergence.h"
#include "reverse_kld.h"
#include "sparse.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &reverse_kld_forward,
        "Reverse-KL forward over [N, V] logits: returns (kl, student_logprob, teacher_logprob, entropy, "
        "row_stats [N, 4]).",
        py::arg("student"), py::arg("teacher"), py::arg("target"), py::arg("mask"), py::arg("inv_temperature"),
        py::arg("vocab_size"));
  m.def("backward", &reverse_kld_backward,
        "Reverse-KL backward: gradient [N, Vs] w.r.t. the student logits from the upstream grads of "
        "(kl, student_logprob, entropy) and the forward outputs.",
        py::arg("student"), py::arg("teacher"), py::arg("target"), py::arg("mask"), py::arg("grad_kl"),
        py::arg("grad_student_logprob"), py::arg("grad_entropy"), py::arg("kl"), py::arg("entropy"),
        py::arg("row_stats"), py::arg("inv_temperature"), py::arg("vocab_size"));
  m.def("divergence_forward", &divergence_forward,
        "Divergence-family forward over row views: returns (divergence, mean_partial, row_stats [N, 4]).",
        py::arg("student"), py::arg("teacher"), py::arg("mask"), py::arg("divergence"), py::arg("coefficient"),
        py::arg("inv_temperature"), py::arg("vocab_size"), py::arg("given_row_stats") = py::none());
  m.def("divergence_backward", &divergence_backward,
        "Divergence-family backward: gradient [N, Vs] w.r.t. the student logits from the upstream grad of the "
        "divergence and the forward outputs.",
        py::arg("student"), py::arg("teacher"), py::arg("mask"), py::arg("grad_divergence"), py::arg("mean_partial"),
        py::arg("row_stats"), py::arg("divergence"), py::arg("coefficient"), py::arg("inv_temperature"),
        py::arg("vocab_size"));
  m.def("sparse_divergence_forward", &sparse_divergence_forward,
        "Sparse-teacher forward over a student row view and [N, K] teacher ids and log-probabilities: returns "
        "(value, student_logprob, entropy, mean_partial, row_stats [N, 4]).",
        py::arg("student"), py::arg("teacher_ids"), py::arg("teacher_logprobs"), py::arg("target"), py::arg("mask"),
        py::arg("divergence"), py::arg("tail"), py::arg("coefficient"), py::arg("inv_temperature"),
        py::arg("vocab_size"));
  m.def("sparse_divergence_backward", &sparse_divergence_backward,
        "Sparse-teacher backward: gradient [N, Vs] w.r.t. the student logits from the upstream grads of "
        "(value, student_logprob, entropy) and the forward outputs.",
        py::arg("student"), py::arg("teacher_ids"), py::arg("teacher_logprobs"), py::arg("target"), py::arg("mask"),
        py::arg("grad_value"), py::arg("grad_student_logprob"), py::arg("grad_entropy"), py::arg("entropy"),
        py::arg("mean_partial"), py::arg("row_stats"), py::arg("divergence"), py::arg("tail"), py::arg("coefficient"),
        py::arg("inv_temperature"), py::arg("vocab_size"));
}
