// nnx-metal's C runtime: open an exported nnx-metal artifact, verified, and run it without Python.
//
// C11 over IREE's public runtime API. An artifact is the directory `compile.export(...).save()`
// writes (manifest.json, module.vmfb, params.irpa, ...). Opening it checks every file's sha256
// against the manifest (and the manifest against a pinned digest, if given), checks the manifest
// against the interface the module records, loads module.vmfb with params.irpa under the
// parameter scope "model" and keeps the state (parameters, optimizer state, counters) on the device
// between calls, as the Python `compile.runtime.Program` does.
//
// Threads: every call on one program (functions, state reads and writes, save) is serialized by a
// mutex in the program, because each one reads and writes the same device globals; programs are
// independent of each other. This is the Python Program's guarantee.
//
// Errors: every function returns NNX_OK or an error code, and fills `error` (when not NULL) with
// the code and a message naming the file, field, function or variable and what to do.
#ifndef NNX_METAL_H_
#define NNX_METAL_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// The IREE runtime this library was written and tested against, and the compiler release whose
// modules it runs (the iree-base-compiler nnx-metal pins). Checked at open (NNX_ERROR_VERSION).
#define NNX_METAL_IREE_RUNTIME_COMMIT "b48a5955575cf8924ffc191f3b0804976e5738b9"
#define NNX_METAL_IREE_COMPILER_RELEASE "3.13"
// The manifest format this library reads (compile/runtime/_file_names.py FORMAT_VERSION).
#define NNX_METAL_FORMAT_VERSION 5

typedef enum nnx_code {
  NNX_OK = 0,
  NNX_ERROR_ARGUMENT = 1,   // a NULL or ill-formed argument from the caller
  NNX_ERROR_IO = 2,         // a file or directory cannot be read or written
  NNX_ERROR_ARTIFACT = 3,   // a missing, corrupt, edited, foreign or unsafe file in the artifact
  NNX_ERROR_DIGEST = 4,     // the manifest is not the one of the pinned digest
  NNX_ERROR_VERSION = 5,    // the artifact needs another runtime or compiler version (the message says which)
  NNX_ERROR_DEVICE = 6,     // no such driver or device here
  NNX_ERROR_SIGNATURE = 7,  // no such function, or inputs/outputs of the wrong count or size
  NNX_ERROR_STATE = 8,      // no such state variable, or a value of the wrong size
  NNX_ERROR_EXECUTION = 9,  // the device failed while running a function
  NNX_ERROR_MEMORY = 10,    // out of memory
} nnx_code_t;

typedef struct nnx_error {
  nnx_code_t code;
  char message[1024];
} nnx_error_t;

// The name of a code ("NNX_ERROR_ARTIFACT").
const char *nnx_code_name(nnx_code_t code);

// Element types, as the manifest names them ("float32", "uint32", "bfloat16", ...).
typedef enum nnx_dtype {
  NNX_BOOL,
  NNX_INT8,
  NNX_INT16,
  NNX_INT32,
  NNX_INT64,
  NNX_UINT8,
  NNX_UINT16,
  NNX_UINT32,
  NNX_UINT64,
  NNX_FLOAT16,
  NNX_BFLOAT16,
  NNX_FLOAT32,
  NNX_FLOAT64,
  NNX_COMPLEX64,
  NNX_COMPLEX128,
  NNX_FLOAT8_E4M3FN,
  NNX_FLOAT8_E5M2,
  NNX_DTYPE_COUNT,
} nnx_dtype_t;

const char *nnx_dtype_name(nnx_dtype_t dtype);
size_t nnx_dtype_size(nnx_dtype_t dtype);

#define NNX_MAX_RANK 64

// An array at a function's boundary or a state variable. Host data is always `dtype`, C order;
// float64 is converted to and from the device's float32 where the target has no f64 (metal, vulkan).
typedef struct nnx_tensor {
  const char *name;  // an input or output name; a state variable's NNX path joined with dots ("model.linear1.w")
  nnx_dtype_t dtype;         // what the caller passes and gets
  nnx_dtype_t device_dtype;  // what the device holds
  size_t rank;
  const int64_t *shape;
  size_t element_count;
  size_t byte_length;  // element_count * nnx_dtype_size(dtype): the host buffer's size
} nnx_tensor_t;

typedef struct nnx_function {
  const char *name;
  size_t input_count, output_count;
  const nnx_tensor_t *inputs, *outputs;  // flat, in order (nested Python inputs flatten as JAX does: dict keys sorted)
} nnx_function_t;

typedef struct nnx_program nnx_program_t;

typedef struct nnx_open_options {
  const char *driver;  // an IREE driver: "local-sync", "local-task", "vulkan", "metal"; NULL: the target's first
  const char *digest;  // the artifact's digest (sha256 of manifest.json, 64 hex digits) to pin it; NULL: not pinned
} nnx_open_options_t;

// Opens, verifies and loads an artifact directory. `options` may be NULL. On success *out is a
// program to free with nnx_program_close.
nnx_code_t nnx_program_open(const char *directory, const nnx_open_options_t *options, nnx_program_t **out,
                            nnx_error_t *error);
void nnx_program_close(nnx_program_t *program);

const char *nnx_program_target(const nnx_program_t *program);  // "cpu", "metal", "vulkan", "metal-vulkan"
const char *nnx_program_driver(const nnx_program_t *program);  // the driver it runs on
// The artifact's digest: the sha256 of its manifest.json, 64 hex digits.
const char *nnx_program_digest(const nnx_program_t *program);

size_t nnx_program_function_count(const nnx_program_t *program);
const nnx_function_t *nnx_program_function(const nnx_program_t *program, size_t i);
// The function called `name`, or NULL.
const nnx_function_t *nnx_program_find_function(const nnx_program_t *program, const char *name);

size_t nnx_program_state_count(const nnx_program_t *program);
const nnx_tensor_t *nnx_program_state_variable(const nnx_program_t *program, size_t i);
// The state variable called `name` (its NNX path joined with dots), or NULL.
const nnx_tensor_t *nnx_program_find_state(const nnx_program_t *program, const char *name);

// Calls `function` (from this program) on host inputs; writes its outputs into host buffers. The state
// stays on the device. inputs[i] must hold function->inputs[i].byte_length bytes, outputs[i] room for
// function->outputs[i].byte_length bytes.
nnx_code_t nnx_program_call(nnx_program_t *program, const nnx_function_t *function, const void *const *inputs,
                            void *const *outputs, nnx_error_t *error);

// Copies the state variable `name` from the device into `data` (`byte_length` bytes, its dtype, C order).
nnx_code_t nnx_program_read_state(nnx_program_t *program, const char *name, void *data, size_t byte_length,
                                  nnx_error_t *error);
// Replaces the state variable `name` on the device with `data`; the others are kept. A variable no
// function writes (the weights of an inference program) is constant on the device, so that IREE prepares
// what depends on it once, at load: writing a new value loads the module again (as long as opening it).
nnx_code_t nnx_program_write_state(nnx_program_t *program, const char *name, const void *data, size_t byte_length,
                                   nnx_error_t *error);

// Writes the program with its current device state as a new artifact directory, which
// `compile.load_program` opens and `program.update(model)` merges into the eager model. `directory`
// must not exist (nothing is replaced); it is written under a temporary name and renamed when complete.
nnx_code_t nnx_program_save(nnx_program_t *program, const char *directory, nnx_error_t *error);

#ifdef __cplusplus
}  // extern "C"
#endif

#endif  // NNX_METAL_H_
