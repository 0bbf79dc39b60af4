// Runs a Relax VM library exported by tvm-rmsmp (CompiledModel.export_library) on one CPU:
// the test builds this file with aarch64-linux-gnu-g++ against the AArch64 TVM runtime
// (libtvm_runtime.so, libtvm_ffi.so from the pinned wheels) and runs it under qemu-aarch64.
//
//   runner LIB OUT IN_FILE:d0,d1,... [IN_FILE:d0,...]...
//
// Inputs are raw little-endian float32 files with the given shapes; every output tensor of
// `main` (a tensor, or a tuple of tensors, flattened in order) is appended to OUT as raw
// bytes, and one line per output "dtype_code bits d0,d1,..." is printed to stdout.
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

namespace {

struct AlignedCPUAlloc {
  void AllocData(DLTensor* t) {
    size_t n = ffi::GetDataSize(*t);
    t->data = std::aligned_alloc(64, (n + 63) / 64 * 64 + 64);
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

ffi::Tensor ReadInput(const std::string& spec) {
  size_t colon = spec.rfind(':');
  if (colon == std::string::npos) throw std::runtime_error("input spec without ':' " + spec);
  std::string path = spec.substr(0, colon);
  std::vector<int64_t> shape;
  std::stringstream dims(spec.substr(colon + 1));
  for (std::string d; std::getline(dims, d, ',');) shape.push_back(std::stoll(d));
  ffi::Tensor t = ffi::Tensor::FromNDAlloc(AlignedCPUAlloc(), ffi::Shape(shape), DLDataType{kDLFloat, 32, 1},
                                           DLDevice{kDLCPU, 0});
  size_t bytes = ffi::GetDataSize(*t.GetDLTensorPtr());
  std::ifstream in(path, std::ios::binary);
  in.read(static_cast<char*>(t.data_ptr()), static_cast<std::streamsize>(bytes));
  if (static_cast<size_t>(in.gcount()) != bytes) throw std::runtime_error("short input file " + path);
  return t;
}

void Collect(const ffi::Any& value, std::vector<ffi::Tensor>* out) {
  if (auto t = value.try_cast<ffi::Tensor>()) {
    out->push_back(*t);
  } else if (auto arr = value.try_cast<ffi::Array<ffi::Any>>()) {
    for (const ffi::Any& v : *arr) Collect(v, out);
  } else {
    throw std::runtime_error("main returned neither a tensor nor a tuple: " + value.GetTypeKey());
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: " << argv[0] << " LIB OUT [IN:d0,d1,...]...\n";
    return 2;
  }
  try {
    ffi::Module lib = ffi::Module::LoadFromFile(argv[1]);
    ffi::Optional<ffi::Function> load = lib->GetFunction("vm_load_executable", true);
    if (!load.has_value()) throw std::runtime_error("no vm_load_executable in the library");
    ffi::Module vm = (*load)().cast<ffi::Module>();
    // one CPU device (kDLCPU, 0) with the pooled allocator (2), as relax.VirtualMachine does
    vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, 2);
    std::vector<ffi::Tensor> inputs;
    for (int i = 3; i < argc; ++i) inputs.push_back(ReadInput(argv[i]));
    std::vector<ffi::AnyView> args(inputs.begin(), inputs.end());
    ffi::Any result;
    vm->GetFunction("main").value().CallPacked(args.data(), static_cast<int32_t>(args.size()), &result);
    std::vector<ffi::Tensor> outputs;
    Collect(result, &outputs);
    std::ofstream out(argv[2], std::ios::binary);
    for (const ffi::Tensor& t : outputs) {
      const DLTensor* dl = t.GetDLTensorPtr();
      if (dl->device.device_type != kDLCPU) throw std::runtime_error("output not on the CPU");
      out.write(static_cast<const char*>(dl->data) + dl->byte_offset,
                static_cast<std::streamsize>(ffi::GetDataSize(*dl)));
      std::cout << static_cast<int>(dl->dtype.code) << " " << static_cast<int>(dl->dtype.bits) << " ";
      for (int d = 0; d < dl->ndim; ++d) std::cout << (d ? "," : "") << dl->shape[d];
      std::cout << "\n";
    }
    return out.good() ? 0 : 3;
  } catch (const std::exception& err) {
    std::cerr << "aarch64_runner: " << err.what() << "\n";
    return 1;
  }
}
