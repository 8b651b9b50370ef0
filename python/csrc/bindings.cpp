// torch_dp._C: a thin pybind11 layer over the public C++ API and over what only Python needs (dict_watch.h,
// worker_threads.h).

#include <torch_dp/comm.h>
#include <torch_dp/detail/loss_rules.h>
#include <torch_dp/gather.h>
#include <torch_dp/package_data_parallel.h>
#include <torch_dp/parallel_apply.h>
#include <torch_dp/replicate.h>
#include <torch_dp/scatter.h>
#include <torch_dp/script_data_parallel.h>

#include "dict_watch.h"
#include "test_access.h"
#include "worker_threads.h"

#include <torch/csrc/Exceptions.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "torch_dp's C++ engine: scatter, gather, coalesced broadcast, persistent replicas and workers";

  m.def(
      "chunk_sizes",
      [](int64_t size, int64_t num_chunks) {
        HANDLE_TH_ERRORS
        return torch_dp::chunk_sizes(size, num_chunks);
        END_HANDLE_TH_ERRORS_PYBIND
      },
      py::arg("size"), py::arg("num_chunks"));

  m.def(
      "scatter",
      [](const at::Tensor& input, const std::vector<c10::Device>& devices,
         const std::optional<std::vector<int64_t>>& sizes, int64_t dim) {
        HANDLE_TH_ERRORS
        return torch_dp::scatter(input, devices, sizes, dim);
        END_HANDLE_TH_ERRORS_PYBIND
      },
      py::arg("input"), py::arg("devices"), py::arg("sizes") = py::none(), py::arg("dim") = 0);

  m.def(
      "gather",
      [](const std::vector<at::Tensor>& tensors, c10::Device destination, int64_t dim) {
        HANDLE_TH_ERRORS
        return torch_dp::gather(tensors, destination, dim);
        END_HANDLE_TH_ERRORS_PYBIND
      },
      py::arg("tensors"), py::arg("destination"), py::arg("dim") = 0);

  m.def(
      "broadcast_coalesced",
      [](const std::vector<at::Tensor>& tensors, const std::vector<c10::Device>& devices) {
        HANDLE_TH_ERRORS
        return torch_dp::broadcast_coalesced(tensors, devices);
        END_HANDLE_TH_ERRORS_PYBIND
      },
      py::arg("tensors"), py::arg("devices"));

  m.def(
      "reduce_add_coalesced",
      [](const std::vector<std::vector<at::Tensor>>& inputs, c10::Device destination) {
        HANDLE_TH_ERRORS
        return torch_dp::reduce_add_coalesced(inputs, destination);
        END_HANDLE_TH_ERRORS_PYBIND
      },
      py::arg("inputs"), py::arg("destination"));

  py::class_<torch_dp::Replicator>(m, "Replicator")
      .def(
          py::init([](bool trust_version_counters, bool copy_everything) {
            auto replicator = std::make_unique<torch_dp::Replicator>(trust_version_counters);
            if (copy_everything) {
              torch_dp::detail::TestAccess::copy_everything(*replicator);  // torch_dp's own tests
            }
            return replicator;
          }),
          py::arg("trust_version_counters") = false, py::arg("copy_everything") = false)
      .def(
          "set_sources",
          [](torch_dp::Replicator& self, std::vector<at::Tensor> params, std::vector<at::Tensor> buffers) {
            HANDLE_TH_ERRORS
            self.set_sources(std::move(params), std::move(buffers));
            END_HANDLE_TH_ERRORS_PYBIND
          },
          py::arg("params"), py::arg("buffers"))
      .def(
          "check_device",
          [](const torch_dp::Replicator& self, c10::Device expected) {
            HANDLE_TH_ERRORS
            self.check_device(expected);
            END_HANDLE_TH_ERRORS_PYBIND
          },
          py::arg("expected"))
      .def(
          "replicate",
          // Returns, per slot, its tensors, or None where the slot's tensors are the objects returned last time.
          [](torch_dp::Replicator& self, const std::vector<c10::Device>& devices, size_t num_slots,
             bool differentiable) {
            HANDLE_TH_ERRORS
            auto slots = self.replicate(devices, num_slots, differentiable);
            std::vector<std::optional<std::vector<at::Tensor>>> result(slots.size());
            for (size_t j = 0; j < slots.size(); ++j) {
              if (self.changed()[j]) {
                result[j] = std::move(slots[j]);
              }
            }
            return result;
            END_HANDLE_TH_ERRORS_PYBIND
          },
          py::arg("devices"), py::arg("num_slots"), py::arg("differentiable"))
      .def_property_readonly("num_params", [](const torch_dp::Replicator& self) { return self.params().size(); })
      .def_property_readonly("num_buffers", [](const torch_dp::Replicator& self) { return self.buffers().size(); });

  // A torch.jit.ScriptModule's C++ module (module._c) converts to and from torch::jit::Module through torch's own
  // registration of torch._C.ScriptModule.
  py::class_<torch_dp::ScriptReplicas>(m, "ScriptReplicas")
      .def(
          py::init([](bool trust_version_counters, bool copy_everything) {
            auto replicas = std::make_unique<torch_dp::ScriptReplicas>(trust_version_counters);
            if (copy_everything) {
              torch_dp::detail::TestAccess::copy_everything(*replicas);  // torch_dp's own tests
            }
            return replicas;
          }),
          py::arg("trust_version_counters") = false, py::arg("copy_everything") = false)
      .def(
          "sync",
          [](torch_dp::ScriptReplicas& self, const torch::jit::Module& module,
             const std::vector<c10::Device>& devices) {
            HANDLE_TH_ERRORS
            self.sync(module, devices);
            END_HANDLE_TH_ERRORS_PYBIND
          },
          py::arg("module"), py::arg("devices"))
      .def(
          "check_device",
          [](const torch_dp::ScriptReplicas& self, c10::Device expected) {
            HANDLE_TH_ERRORS
            self.check_device(expected);
            END_HANDLE_TH_ERRORS_PYBIND
          },
          py::arg("expected"))
      .def(
          "get",
          [](torch_dp::ScriptReplicas& self, size_t count, bool differentiable) {
            HANDLE_TH_ERRORS
            return self.get(count, differentiable);
            END_HANDLE_TH_ERRORS_PYBIND
          },
          py::arg("count"), py::arg("differentiable"))
      .def("uses_module", &torch_dp::ScriptReplicas::uses_module, py::arg("slot"))
      .def_property_readonly("generation", &torch_dp::ScriptReplicas::generation);

  py::enum_<torch_dp::Issuing>(m, "Issuing")
      .value("auto", torch_dp::Issuing::kAuto)
      .value("threads", torch_dp::Issuing::kThreads)
      .value("serial", torch_dp::Issuing::kSerial);
  m.def(
      "resolve_issuing",
      [](torch_dp::Issuing issuing, const std::vector<c10::Device>& devices) {
        return torch_dp::resolve_issuing(issuing, devices);
      },
      py::arg("issuing"), py::arg("devices"));

  py::class_<torch_dp::WorkerPool>(m, "WorkerPool")
      .def(py::init<>())
      .def_property_readonly("num_threads", &torch_dp::WorkerPool::num_threads)
      .def_property_readonly("settled_auto_issuing", &torch_dp::WorkerPool::settled_auto_issuing);
  m.def(
      "issuing_after_forward",
      [](torch_dp::Issuing issuing, const torch_dp::WorkerPool& pool, const std::vector<c10::Device>& devices) {
        return torch_dp::issuing_after_forward(issuing, pool, devices);
      },
      py::arg("issuing"), py::arg("pool"), py::arg("devices"));

  m.def(
      "run_replicas",
      // fn(i) runs replica i; what escapes it is re-raised after all replicas ran (worker_threads.h).
      &torch_dp::python::run_replicas, py::arg("pool"), py::arg("devices"), py::arg("fn"),
      py::arg("issuing") = torch_dp::Issuing::kThreads, py::arg("reproducible") = false);

  // The exact rules of ParallelCriterion (loss_rules.h), for the Python ParallelCriterion.
  py::class_<torch_dp::detail::LossRule>(m, "LossRule")
      .def(
          py::init([](std::string name, std::string reduction, std::optional<at::Tensor> weight,
                      std::optional<at::Tensor> pos_weight, int64_t ignore_index, double label_smoothing, double beta,
                      double delta, bool log_target) {
            return torch_dp::detail::LossRule{
                std::move(name),
                std::move(reduction),
                weight.value_or(at::Tensor()),
                pos_weight.value_or(at::Tensor()),
                ignore_index,
                label_smoothing,
                beta,
                delta,
                log_target};
          }),
          py::arg("name"), py::arg("reduction"), py::kw_only(), py::arg("weight") = py::none(),
          py::arg("pos_weight") = py::none(), py::arg("ignore_index") = -100, py::arg("label_smoothing") = 0.0,
          py::arg("beta") = 1.0, py::arg("delta") = 1.0, py::arg("log_target") = false)
      .def_readonly("name", &torch_dp::detail::LossRule::name)
      .def_readonly("reduction", &torch_dp::detail::LossRule::reduction);
  m.def("has_exact_rule", &torch_dp::detail::has_exact_rule, py::arg("name"));
  m.def("exact_rule_names", &torch_dp::detail::exact_rule_names);
  m.def(
      "check_loss_reduction",
      [](const torch_dp::detail::LossRule& rule) {
        HANDLE_TH_ERRORS
        torch_dp::detail::check_loss_reduction(rule);
        END_HANDLE_TH_ERRORS_PYBIND
      },
      py::arg("rule"));
  m.def(
      "loss_part",
      [](const torch_dp::detail::LossRule& rule, const at::Tensor& input, const at::Tensor& target, int64_t split_dim,
         bool first) {
        HANDLE_TH_ERRORS
        py::gil_scoped_release no_gil;  // replicas' losses run side by side; warnings and errors reach Python
        return torch_dp::detail::loss_part(rule, input, target, split_dim, first);
        END_HANDLE_TH_ERRORS_PYBIND
      },
      py::arg("rule"), py::arg("input"), py::arg("target"), py::arg("split_dim"), py::arg("first"));
  m.def(
      "reduce_loss_parts",
      [](const std::vector<at::Tensor>& values, const std::vector<at::Tensor>& counts, bool sum,
         const std::vector<int64_t>& rows, c10::Device destination) {
        HANDLE_TH_ERRORS
        return torch_dp::detail::reduce_loss_parts(values, counts, sum, rows, destination);
        END_HANDLE_TH_ERRORS_PYBIND
      },
      py::arg("values"), py::arg("counts"), py::arg("sum"), py::arg("rows"), py::arg("destination"));
  m.def("none_gather_dim", &torch_dp::detail::none_gather_dim, py::arg("rule"), py::arg("part"), py::arg("split_dim"));

  m.def(
      "replica_location",
      [](size_t replica, c10::Device device) { return torch_dp::replica_location(replica, device); },
      py::arg("replica"), py::arg("device"));

  m.def(
      "read_package_metadata",
      [](const std::string& path) {
        HANDLE_TH_ERRORS
        return torch_dp::detail::read_package_metadata(path);
        END_HANDLE_TH_ERRORS_PYBIND
      },
      py::arg("path"));
  m.def(
      "check_package_devices",
      [](const std::string& path, const std::unordered_map<std::string, std::string>& metadata,
         const std::vector<c10::Device>& devices) {
        HANDLE_TH_ERRORS
        torch_dp::detail::check_package_devices(path, metadata, devices);
        END_HANDLE_TH_ERRORS_PYBIND
      },
      py::arg("path"), py::arg("metadata"), py::arg("devices"));

  // forward releases the GIL (call_guard) while the loaders run; a c10::Error it throws reaches Python through
  // torch's exception translator, with the GIL held again, as the same RuntimeError/ValueError.
  py::class_<torch_dp::PackageDataParallel>(m, "PackageDataParallel")
      .def(
          py::init([](const std::string& path, const std::vector<c10::Device>& devices,
                      std::optional<c10::Device> output_device, int64_t dim,
                      std::optional<std::vector<int64_t>> chunk_sizes, torch_dp::Issuing issuing) {
            HANDLE_TH_ERRORS
            torch_dp::DataParallelOptions options(devices);
            options.output_device(output_device).dim(dim).chunk_sizes(std::move(chunk_sizes)).issuing(issuing);
            py::gil_scoped_release no_gil;
            return std::make_unique<torch_dp::PackageDataParallel>(path, std::move(options));
            END_HANDLE_TH_ERRORS_PYBIND
          }),
          py::arg("path"), py::arg("devices"), py::arg("output_device") = py::none(), py::arg("dim") = 0,
          py::arg("chunk_sizes") = py::none(), py::arg("issuing") = torch_dp::Issuing::kAuto)
      .def(
          "forward", py::overload_cast<const std::vector<at::Tensor>&>(&torch_dp::PackageDataParallel::forward),
          py::arg("inputs"), py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("path", &torch_dp::PackageDataParallel::path)
      .def_property_readonly("metadata", &torch_dp::PackageDataParallel::metadata)
      .def_property_readonly("call_spec", &torch_dp::PackageDataParallel::call_spec)
      .def_property_readonly(
          "package_device_type",
          [](const torch_dp::PackageDataParallel& self) {
            return c10::DeviceTypeName(self.package_device_type(), true);
          })
      .def_property_readonly("devices", &torch_dp::PackageDataParallel::devices)
      .def_property_readonly("output_device", &torch_dp::PackageDataParallel::output_device)
      .def_property_readonly("pool", &torch_dp::PackageDataParallel::pool, py::return_value_policy::reference_internal)
      .def_property_readonly("num_loads", &torch_dp::PackageDataParallel::num_loads);

  using torch_dp::python::DictWatch;
  py::class_<DictWatch>(m, "DictWatch")
      .def(py::init<py::list>(), py::arg("dicts"))
      .def("unchanged", &DictWatch::unchanged)
      .def("retake", &DictWatch::retake)
      .def_property_readonly("num_dicts", &DictWatch::num_dicts)
      .def_property_readonly("fast", &DictWatch::fast);
}
