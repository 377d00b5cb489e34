// nnx-metal's C runtime (see nnx_metal.h): verify an artifact, load it on an IREE device, call it.
//
// How the library learns the calling convention: from the module itself. Export records the
// program's interface (every state variable and every function's flat inputs, outputs, their
// dtypes and shapes) as canonical JSON in the `nnx.interface` reflection attribute of the module's
// `nnx_get_state` function, next to `nnx.state_globals` (the order of the state globals). The
// manifest's copy must equal it (what the Python side checks), so an edited manifest cannot change
// what a caller gets, and the app developer describes nothing by hand.
#define _GNU_SOURCE  // memmem
#include "nnx_metal.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "iree/base/api.h"
#include "iree/base/tooling/flags.h"
#include "iree/hal/api.h"
#include "iree/io/file_handle.h"
#include "iree/io/formats/irpa/irpa_builder.h"
#include "iree/io/formats/irpa/irpa_parser.h"
#include "iree/io/parameter_index.h"
#include "iree/io/parameter_index_provider.h"
#include "iree/modules/hal/types.h"
#include "iree/modules/io/parameters/module.h"
#include "iree/runtime/api.h"
#include "iree/vm/bytecode/module.h"
#include "nnx_json.h"
#include "nnx_sha256.h"

#define MANIFEST "manifest.json"
#define MODULE "module.vmfb"
#define PARAMS "params.irpa"
#define PARAMETER_SCOPE "model"
#define FORMAT "nnx-metal-artifact"
#define GET_STATE "nnx_get_state"
#define SET_STATE "nnx_set_state"
#define INTERFACE_ATTRIBUTE "nnx.interface"
#define STATE_ORDER_ATTRIBUTE "nnx.state_globals"
#define MAX_DIMENSION ((int64_t)1 << 40)
#define MAX_TENSOR_BYTES ((uint64_t)1 << 46)
// local-task's worker stack: 8x the 128 KiB a cpu kernel may take (compile/runtime/_targets.py CPU_KERNEL_STACK).
#define TASK_WORKER_STACK (8 * 128 * 1024)
// Python picks local-task for a cpu program with a function of at least this many FLOP a call (_targets.py).
#define PARALLEL_MIN_FLOPS 40e6

// ---------------------------------------------------------------------------------------------------------
// Errors.

static nnx_code_t fail(nnx_error_t *error, nnx_code_t code, const char *format, ...) {
  if (error) {
    error->code = code;
    va_list args;
    va_start(args, format);
    vsnprintf(error->message, sizeof(error->message), format, args);
    va_end(args);
  }
  return code;
}

// Turns an IREE status into `code` with `what` and IREE's message; frees the status.
static nnx_code_t fail_status(nnx_error_t *error, nnx_code_t code, iree_status_t status, const char *what) {
  char text[600] = "";
  iree_host_size_t length = 0;
  iree_status_format(status, sizeof(text), text, &length);
  iree_status_free(status);
  if (iree_status_code(status) == IREE_STATUS_RESOURCE_EXHAUSTED) code = NNX_ERROR_MEMORY;
  return fail(error, code, "%s (%s)", what, text);
}

const char *nnx_code_name(nnx_code_t code) {
  static const char *names[] = {"NNX_OK",          "NNX_ERROR_ARGUMENT", "NNX_ERROR_IO",        "NNX_ERROR_ARTIFACT",
                                "NNX_ERROR_DIGEST", "NNX_ERROR_VERSION",  "NNX_ERROR_DEVICE",    "NNX_ERROR_SIGNATURE",
                                "NNX_ERROR_STATE",  "NNX_ERROR_EXECUTION", "NNX_ERROR_MEMORY"};
  return (unsigned)code < sizeof(names) / sizeof(*names) ? names[code] : "NNX_ERROR_UNKNOWN";
}

// ---------------------------------------------------------------------------------------------------------
// Element types: the manifest's names, sizes, and the HAL types a device result of each may carry
// (IREE's integer results are often signless), as compile/runtime/_dtypes.py has them.

typedef struct dtype_info {
  const char *name;
  size_t size;
  iree_hal_element_type_t hal;  // what host inputs are passed as
  iree_hal_element_type_t accepted[4];
} dtype_info_t;

static const dtype_info_t DTYPES[NNX_DTYPE_COUNT] = {
  [NNX_BOOL] = {"bool", 1, IREE_HAL_ELEMENT_TYPE_BOOL_8,
                {IREE_HAL_ELEMENT_TYPE_INT_8, IREE_HAL_ELEMENT_TYPE_UINT_8, IREE_HAL_ELEMENT_TYPE_SINT_8}},
  [NNX_INT8] = {"int8", 1, IREE_HAL_ELEMENT_TYPE_SINT_8, {IREE_HAL_ELEMENT_TYPE_INT_8}},
  [NNX_INT16] = {"int16", 2, IREE_HAL_ELEMENT_TYPE_SINT_16, {IREE_HAL_ELEMENT_TYPE_INT_16}},
  [NNX_INT32] = {"int32", 4, IREE_HAL_ELEMENT_TYPE_SINT_32, {IREE_HAL_ELEMENT_TYPE_INT_32}},
  [NNX_INT64] = {"int64", 8, IREE_HAL_ELEMENT_TYPE_SINT_64, {IREE_HAL_ELEMENT_TYPE_INT_64}},
  [NNX_UINT8] = {"uint8", 1, IREE_HAL_ELEMENT_TYPE_UINT_8, {IREE_HAL_ELEMENT_TYPE_INT_8}},
  [NNX_UINT16] = {"uint16", 2, IREE_HAL_ELEMENT_TYPE_UINT_16, {IREE_HAL_ELEMENT_TYPE_INT_16}},
  [NNX_UINT32] = {"uint32", 4, IREE_HAL_ELEMENT_TYPE_UINT_32, {IREE_HAL_ELEMENT_TYPE_INT_32}},
  [NNX_UINT64] = {"uint64", 8, IREE_HAL_ELEMENT_TYPE_UINT_64, {IREE_HAL_ELEMENT_TYPE_INT_64}},
  [NNX_FLOAT16] = {"float16", 2, IREE_HAL_ELEMENT_TYPE_FLOAT_16, {0}},
  [NNX_BFLOAT16] = {"bfloat16", 2, IREE_HAL_ELEMENT_TYPE_BFLOAT_16, {0}},
  [NNX_FLOAT32] = {"float32", 4, IREE_HAL_ELEMENT_TYPE_FLOAT_32, {0}},
  [NNX_FLOAT64] = {"float64", 8, IREE_HAL_ELEMENT_TYPE_FLOAT_64, {0}},
  [NNX_COMPLEX64] = {"complex64", 8, IREE_HAL_ELEMENT_TYPE_COMPLEX_FLOAT_64, {0}},
  [NNX_COMPLEX128] = {"complex128", 16, IREE_HAL_ELEMENT_TYPE_COMPLEX_FLOAT_128, {0}},
  [NNX_FLOAT8_E4M3FN] = {"float8_e4m3fn", 1, IREE_HAL_ELEMENT_TYPE_FLOAT_8_E4M3_FN, {0}},
  [NNX_FLOAT8_E5M2] = {"float8_e5m2", 1, IREE_HAL_ELEMENT_TYPE_FLOAT_8_E5M2, {0}},
};

const char *nnx_dtype_name(nnx_dtype_t dtype) { return (unsigned)dtype < NNX_DTYPE_COUNT ? DTYPES[dtype].name : "?"; }
size_t nnx_dtype_size(nnx_dtype_t dtype) { return (unsigned)dtype < NNX_DTYPE_COUNT ? DTYPES[dtype].size : 0; }

static int dtype_from_name(const char *name, nnx_dtype_t *out) {
  for (int i = 0; name && i < NNX_DTYPE_COUNT; ++i) {
    if (strcmp(DTYPES[i].name, name) == 0) {
      *out = (nnx_dtype_t)i;
      return 0;
    }
  }
  return -1;
}

static int accepts(nnx_dtype_t dtype, iree_hal_element_type_t got) {
  if (got == DTYPES[dtype].hal) return 1;
  for (int i = 0; i < 4 && DTYPES[dtype].accepted[i]; ++i) {
    if (got == DTYPES[dtype].accepted[i]) return 1;
  }
  return 0;
}

// What a target without f64 (metal, vulkan) holds instead of `dtype` (_dtypes.py DEMOTED).
static nnx_dtype_t demoted(nnx_dtype_t dtype) {
  return dtype == NNX_FLOAT64 ? NNX_FLOAT32 : dtype == NNX_COMPLEX128 ? NNX_COMPLEX64 : dtype;
}

// Converts n elements between a dtype and its demoted device dtype (float64 <-> float32; complex as pairs).
static void convert(const void *from, nnx_dtype_t from_dtype, void *to, nnx_dtype_t to_dtype, size_t count) {
  if (from_dtype == to_dtype) {
    memcpy(to, from, count * DTYPES[from_dtype].size);
    return;
  }
  size_t scalars = count * (from_dtype == NNX_COMPLEX128 || from_dtype == NNX_COMPLEX64 ? 2 : 1);
  if (DTYPES[from_dtype].size > DTYPES[to_dtype].size) {
    for (size_t i = 0; i < scalars; ++i) ((float *)to)[i] = (float)((const double *)from)[i];
  } else {
    for (size_t i = 0; i < scalars; ++i) ((double *)to)[i] = (double)((const float *)from)[i];
  }
}

// ---------------------------------------------------------------------------------------------------------
// Reading an artifact's files: through the directory's handle, no symbolic links, regular files only.

typedef struct file_bytes {
  uint8_t *data;  // 4096-aligned (IREE maps modules and parameters from it)
  size_t size;
} file_bytes_t;

static int safe_file_name(const char *name) {
  if (strcmp(name, MODULE) == 0 || strcmp(name, PARAMS) == 0 || strcmp(name, "module.mlir") == 0) return 1;
  const char *suffix = strncmp(name, "msl/", 4) == 0 ? ".metal" : strncmp(name, "spirv/", 6) == 0 ? ".spv" : NULL;
  if (!suffix) return 0;
  const char *stem = strchr(name, '/') + 1, *dot = strrchr(stem, '.');
  if (!dot || dot == stem || strcmp(dot, suffix) != 0) return 0;
  for (const char *c = stem; c < dot; ++c) {
    if (!((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') || (*c >= '0' && *c <= '9') || *c == '_')) return 0;
  }
  return 1;
}

static nnx_code_t read_file(int directory_fd, const char *directory, const char *relative, size_t limit,
                            file_bytes_t *out, nnx_error_t *error) {
  out->data = NULL, out->size = 0;
  int folder_fd = -1, fd = -1;
  const char *slash = strchr(relative, '/'), *name = relative;
  int parent = directory_fd;
  if (slash) {
    char folder[16];
    size_t n = (size_t)(slash - relative);
    if (n >= sizeof(folder)) return fail(error, NNX_ERROR_ARTIFACT, "%s/%s: not a file of an artifact", directory, relative);
    memcpy(folder, relative, n), folder[n] = '\0';
    folder_fd = openat(directory_fd, folder, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (folder_fd < 0) goto failed;
    parent = folder_fd, name = slash + 1;
  }
  fd = openat(parent, name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) goto failed;
  struct stat info;
  if (fstat(fd, &info) != 0) goto failed;
  nnx_code_t code = NNX_OK;
  if (!S_ISREG(info.st_mode)) {
    code = fail(error, NNX_ERROR_ARTIFACT, "%s/%s is not a regular file. Export the artifact again.", directory, relative);
  } else if ((uint64_t)info.st_size > limit) {
    code = fail(error, NNX_ERROR_ARTIFACT, "%s/%s is %lld bytes, more than an artifact's file may hold here.", directory,
                relative, (long long)info.st_size);
  } else if (posix_memalign((void **)&out->data, 4096, (size_t)info.st_size + 1) != 0) {
    out->data = NULL;
    code = fail(error, NNX_ERROR_MEMORY, "%s/%s: out of memory reading %lld bytes", directory, relative,
                (long long)info.st_size);
  } else {
    size_t done = 0, size = (size_t)info.st_size;
    while (done < size) {
      ssize_t got = read(fd, out->data + done, size - done);
      if (got < 0 && errno == EINTR) continue;
      if (got <= 0) break;
      done += (size_t)got;
    }
    if (done != size) {
      code = fail(error, NNX_ERROR_IO, "Cannot read %s/%s: %s", directory, relative, done < size ? "short read" : "");
      free(out->data), out->data = NULL;
    }
    out->size = done;
  }
  close(fd);
  if (folder_fd >= 0) close(folder_fd);
  return code;
failed:;
  int why = errno;
  if (fd >= 0) close(fd);
  if (folder_fd >= 0) close(folder_fd);
  if (why == ENOENT) {
    return fail(error, NNX_ERROR_ARTIFACT, "%s/%s is missing: the artifact is incomplete. Export it again.", directory,
                relative);
  }
  if (why == ELOOP || why == EMLINK || why == ENOTDIR) {
    return fail(error, NNX_ERROR_ARTIFACT,
                "%s/%s is or passes through a symbolic link or a non-folder; an artifact holds only its own files.",
                directory, relative);
  }
  return fail(error, NNX_ERROR_IO, "Cannot read %s/%s: %s.", directory, relative, strerror(why));
}

// ---------------------------------------------------------------------------------------------------------
// The program.

typedef struct tensor_storage {
  nnx_tensor_t tensor;
  int64_t *shape;
  iree_hal_dim_t *dims;
} tensor_storage_t;

typedef struct function_entry {
  nnx_function_t function;  // first: the public view
  tensor_storage_t *inputs, *outputs;
  nnx_tensor_t *input_views, *output_views;
  iree_vm_function_t vm_function;
  iree_runtime_call_t call;
  int call_ready;
} function_entry_t;

struct nnx_program {
  pthread_mutex_t lock;
  char *directory;
  char target[16];
  char driver[32];
  char digest[65];
  int demote_f64;
  char *manifest_text;
  nnx_json_t manifest;   // function names point into it; save writes it back
  nnx_json_t interface;  // tensor and state names point into it
  file_bytes_t module_bytes, params_bytes;
  char **file_names;  // every file the manifest lists, with its sha256, for save
  char (*file_hashes)[65];
  size_t file_count;
  function_entry_t *functions;
  size_t function_count;
  tensor_storage_t *state;
  nnx_tensor_t *state_views;
  size_t state_count;
  char **state_globals;
  uint8_t *written;  // per state variable: some function writes it (a mutable global); else constant on the device
  size_t written_count;
  iree_runtime_instance_t *instance;
  iree_hal_device_t *device;
  iree_runtime_session_t *session;
  iree_vm_module_t *module;
  iree_io_parameter_index_t *parameter_index;
  iree_io_file_handle_t *params_handle;
  iree_vm_function_t get_state, set_state;
  iree_hal_buffer_view_t *flag;  // nnx_get_state/nnx_set_state take an i32 the compiler cannot see is always 1
};

const char *nnx_program_target(const nnx_program_t *p) { return p->target; }
const char *nnx_program_driver(const nnx_program_t *p) { return p->driver; }
const char *nnx_program_digest(const nnx_program_t *p) { return p->digest; }
size_t nnx_program_function_count(const nnx_program_t *p) { return p->function_count; }
const nnx_function_t *nnx_program_function(const nnx_program_t *p, size_t i) {
  return i < p->function_count ? &p->functions[i].function : NULL;
}
const nnx_function_t *nnx_program_find_function(const nnx_program_t *p, const char *name) {
  for (size_t i = 0; name && i < p->function_count; ++i) {
    if (strcmp(p->functions[i].function.name, name) == 0) return &p->functions[i].function;
  }
  return NULL;
}
size_t nnx_program_state_count(const nnx_program_t *p) { return p->state_count; }
const nnx_tensor_t *nnx_program_state_variable(const nnx_program_t *p, size_t i) {
  return i < p->state_count ? &p->state_views[i] : NULL;
}
static ptrdiff_t state_index(const nnx_program_t *p, const char *name) {
  for (size_t i = 0; name && i < p->state_count; ++i) {
    if (strcmp(p->state_views[i].name, name) == 0) return (ptrdiff_t)i;
  }
  return -1;
}
const nnx_tensor_t *nnx_program_find_state(const nnx_program_t *p, const char *name) {
  ptrdiff_t i = state_index(p, name);
  return i < 0 ? NULL : &p->state_views[i];
}

static void free_tensors(tensor_storage_t *tensors, size_t count) {
  for (size_t i = 0; tensors && i < count; ++i) free(tensors[i].shape), free(tensors[i].dims);
  free(tensors);
}

void nnx_program_close(nnx_program_t *p) {
  if (!p) return;
  for (size_t i = 0; i < p->function_count; ++i) {
    function_entry_t *f = &p->functions[i];
    if (f->call_ready) iree_runtime_call_deinitialize(&f->call);
    free_tensors(f->inputs, f->function.input_count);
    free_tensors(f->outputs, f->function.output_count);
    free(f->input_views), free(f->output_views);
  }
  free(p->functions);
  free_tensors(p->state, p->state_count);
  free(p->state_views);
  free(p->state_globals);
  free(p->written);
  iree_hal_buffer_view_release(p->flag);
  iree_runtime_session_release(p->session);
  iree_vm_module_release(p->module);
  iree_io_file_handle_release(p->params_handle);
  iree_io_parameter_index_release(p->parameter_index);
  iree_hal_device_release(p->device);
  iree_runtime_instance_release(p->instance);
  for (size_t i = 0; i < p->file_count; ++i) free(p->file_names[i]);
  free(p->file_names), free(p->file_hashes);
  nnx_json_free(&p->manifest);
  nnx_json_free(&p->interface);
  free(p->manifest_text);
  free(p->module_bytes.data), free(p->params_bytes.data);
  free(p->directory);
  pthread_mutex_destroy(&p->lock);
  free(p);
}

// ---------------------------------------------------------------------------------------------------------
// The manifest: the fields this library uses are checked; the interface fields must equal the module's.

static const char *const MANIFEST_FIELDS[] = {
  "format",   "format_version", "model",    "objects",   "graphdef_fingerprint", "target", "flags", "versions",
  "dispatches", "rewrites", "hazard_check", "state", "functions", "files", NULL};
static const char *const FUNCTION_FIELDS[] = {"label",   "method",      "mode",           "inputs", "outputs", "structure",
                                              "updates", "executables", "dispatch_count", "flops",  NULL};
// What decides what callers get (_manifest.py _INTERFACE_FIELDS).
static const char *const INTERFACE_FIELDS[] = {"label", "method", "mode", "inputs", "outputs", "structure", "updates", NULL};
static const char *const TARGETS[] = {"metal", "metal-vulkan", "vulkan", "cpu", "cuda", NULL};
// The kernel format each target's module holds (_module_check.py _KERNEL_FORMATS).
static const char *const KERNEL_FORMATS[] = {"metal-msl-fb", "vulkan-spirv-fb", "vulkan-spirv-fb", "embedded-elf-",
                                             "cuda-nvptx-fb"};

static int in_list(const char *const *list, const char *text, size_t length) {
  for (int i = 0; list[i]; ++i) {
    if (strlen(list[i]) == length && memcmp(list[i], text, length) == 0) return i;
  }
  return -1;
}

static nnx_code_t manifest_error(nnx_error_t *error, const char *directory, const char *where, const char *problem) {
  return fail(error, NNX_ERROR_ARTIFACT, "%s/" MANIFEST ": %s %s. The artifact is corrupt or was edited; export it again.",
              directory, where, problem);
}

static int is_sha256(const char *text, size_t length) {
  if (!text || length != 64) return 0;
  for (size_t i = 0; i < 64; ++i) {
    if (!((text[i] >= '0' && text[i] <= '9') || (text[i] >= 'a' && text[i] <= 'f'))) return 0;
  }
  return 1;
}

static nnx_code_t check_manifest(nnx_program_t *p, nnx_error_t *error) {
  const nnx_json_t *m = &p->manifest;
  const char *dir = p->directory;
  if (m->values[0].kind != NNX_JSON_OBJECT) return manifest_error(error, dir, "the top level", "must be an object");
  const char *format = nnx_json_string(m, nnx_json_get(m, 0, "format"), NULL);
  if (!format || strcmp(format, FORMAT) != 0) {
    return fail(error, NNX_ERROR_ARTIFACT, "%s/" MANIFEST " is not an nnx-metal manifest (no \"format\": \"" FORMAT "\").",
                dir);
  }
  int64_t version;
  if (nnx_json_integer(m, nnx_json_get(m, 0, "format_version"), 0, INT32_MAX, &version) != 0 ||
      version != NNX_METAL_FORMAT_VERSION) {
    return fail(error, NNX_ERROR_VERSION,
                "%s/" MANIFEST " is not of artifact format version %d, which this library reads. Export the artifact "
                "again with the nnx-metal this library came with.",
                dir, NNX_METAL_FORMAT_VERSION);
  }
  for (uint32_t v = m->values[0].first; v != NNX_JSON_NONE; v = m->values[v].next) {
    if (in_list(MANIFEST_FIELDS, m->strings + m->values[v].key, m->values[v].key_length) < 0) {
      char where[128];
      snprintf(where, sizeof(where), "the top level has unknown field '%.80s', so it", m->strings + m->values[v].key);
      return manifest_error(error, dir, where, "is not a manifest of this version");
    }
  }
  for (int i = 0; MANIFEST_FIELDS[i]; ++i) {
    if (nnx_json_get(m, 0, MANIFEST_FIELDS[i]) == NNX_JSON_NONE) return manifest_error(error, dir, MANIFEST_FIELDS[i], "is missing");
  }
  uint32_t target = nnx_json_get(m, 0, "target");
  size_t length;
  const char *name = nnx_json_string(m, nnx_json_get(m, target, "name"), &length);
  int which = name ? in_list(TARGETS, name, length) : -1;
  if (which < 0) return manifest_error(error, dir, "target.name", "is not a target nnx-metal knows");
  snprintf(p->target, sizeof(p->target), "%s", name);
  uint32_t demote = nnx_json_get(m, target, "demote_f64");
  p->demote_f64 = which <= 2;  // metal, metal-vulkan and vulkan hold f64 as f32
  if (demote == NNX_JSON_NONE || m->values[demote].kind != (p->demote_f64 ? NNX_JSON_TRUE : NNX_JSON_FALSE)) {
    return manifest_error(error, dir, "target.demote_f64", "does not match the target");
  }
  if (memmem(p->module_bytes.data, p->module_bytes.size, KERNEL_FORMATS[which], strlen(KERNEL_FORMATS[which])) == NULL) {
    return fail(error, NNX_ERROR_ARTIFACT,
                "%s/" MODULE " holds no %s kernels, which a '%s' module has: it was compiled for another device. Export "
                "the artifact again.",
                dir, KERNEL_FORMATS[which], p->target);
  }
  if (m->values[nnx_json_get(m, 0, "state")].kind != NNX_JSON_ARRAY) return manifest_error(error, dir, "state", "must be a list");
  uint32_t functions = nnx_json_get(m, 0, "functions");
  if (m->values[functions].kind != NNX_JSON_OBJECT) return manifest_error(error, dir, "functions", "must be an object");
  for (uint32_t f = m->values[functions].first; f != NNX_JSON_NONE; f = m->values[f].next) {
    if (m->values[f].kind != NNX_JSON_OBJECT) return manifest_error(error, dir, "functions.*", "must be objects");
    for (uint32_t v = m->values[f].first; v != NNX_JSON_NONE; v = m->values[v].next) {
      if (in_list(FUNCTION_FIELDS, m->strings + m->values[v].key, m->values[v].key_length) < 0) {
        return manifest_error(error, dir, m->strings + m->values[f].key, "has an unknown field");
      }
    }
  }
  return NNX_OK;
}

// The compiler release the module was built with must be the one this runtime runs (major.minor).
static nnx_code_t check_versions(nnx_program_t *p, nnx_error_t *error) {
  const nnx_json_t *m = &p->manifest;
  const char *built = nnx_json_string(m, nnx_json_get(m, nnx_json_get(m, 0, "versions"), "iree-base-compiler"), NULL);
  const char *release = NNX_METAL_IREE_COMPILER_RELEASE;
  size_t n = strlen(release);
  if (built && strncmp(built, release, n) == 0 && (built[n] == '.' || built[n] == '\0')) return NNX_OK;
  return fail(error, NNX_ERROR_VERSION,
              "%s was compiled by iree-base-compiler %.40s; this library runs modules of iree-base-compiler %s.x (its "
              "IREE runtime is commit " NNX_METAL_IREE_RUNTIME_COMMIT "). Export the artifact again with "
              "iree-base-compiler==%s.*, or build this library against the IREE runtime of release %.40s "
              "(https://github.com/iree-org/iree, tag v%.40s).",
              p->directory, built ? built : "(unknown)", release, release, built ? built : "?", built ? built : "?");
}

// Reads and hashes every file the manifest lists; keeps the module and the parameters.
static nnx_code_t read_files(nnx_program_t *p, int directory_fd, nnx_error_t *error) {
  const nnx_json_t *m = &p->manifest;
  uint32_t files = nnx_json_get(m, 0, "files");
  if (m->values[files].kind != NNX_JSON_OBJECT) return manifest_error(error, p->directory, "files", "must be an object");
  size_t count = m->values[files].length;
  p->file_names = calloc(count ? count : 1, sizeof(*p->file_names));
  p->file_hashes = calloc(count ? count : 1, sizeof(*p->file_hashes));
  if (!p->file_names || !p->file_hashes) return fail(error, NNX_ERROR_MEMORY, "out of memory");
  int has_module = 0, has_params = 0;
  for (uint32_t f = m->values[files].first; f != NNX_JSON_NONE; f = m->values[f].next) {
    const char *relative = m->strings + m->values[f].key;
    size_t hash_length;
    const char *hash = nnx_json_string(m, f, &hash_length);
    if (!safe_file_name(relative)) {
      char where[160];
      snprintf(where, sizeof(where), "files names '%.80s', which", relative);
      return manifest_error(error, p->directory, where, "is not a file of an artifact");
    }
    if (!is_sha256(hash, hash_length)) return manifest_error(error, p->directory, relative, "has no sha256 in files");
    file_bytes_t bytes;
    nnx_code_t code = read_file(directory_fd, p->directory, relative, (size_t)1 << 40, &bytes, error);
    if (code) return code;
    char actual[65];
    nnx_sha256_hex(bytes.data, bytes.size, actual);
    if (strcmp(actual, hash) != 0) {
      free(bytes.data);
      return fail(error, NNX_ERROR_ARTIFACT,
                  "%s/%s is corrupt or was changed: its sha256 is not the one in " MANIFEST ". Export the artifact again.",
                  p->directory, relative);
    }
    p->file_names[p->file_count] = strdup(relative);
    memcpy(p->file_hashes[p->file_count++], hash, 65);
    if (strcmp(relative, MODULE) == 0) {
      p->module_bytes = bytes, has_module = 1;
    } else if (strcmp(relative, PARAMS) == 0) {
      p->params_bytes = bytes, has_params = 1;
    } else {
      free(bytes.data);
    }
  }
  if (!has_module || !has_params) return manifest_error(error, p->directory, "files", "does not list " MODULE " and " PARAMS);
  return NNX_OK;
}

// ---------------------------------------------------------------------------------------------------------
// The interface the module records.

static nnx_code_t interface_error(nnx_error_t *error, const nnx_program_t *p, const char *what) {
  return fail(error, NNX_ERROR_ARTIFACT,
              "%s/" MODULE " records an interface this library cannot use (%s). Export the artifact again.", p->directory,
              what);
}

static nnx_code_t read_tensor(const nnx_program_t *p, const nnx_json_t *j, uint32_t value, tensor_storage_t *out,
                              nnx_error_t *error) {
  out->tensor.name = nnx_json_string(j, nnx_json_get(j, value, "name"), NULL);
  if (!out->tensor.name) return interface_error(error, p, "a tensor without a name");
  if (dtype_from_name(nnx_json_string(j, nnx_json_get(j, value, "dtype"), NULL), &out->tensor.dtype) ||
      dtype_from_name(nnx_json_string(j, nnx_json_get(j, value, "device_dtype"), NULL), &out->tensor.device_dtype)) {
    return interface_error(error, p, "an unknown dtype");
  }
  nnx_dtype_t expected = p->demote_f64 ? demoted(out->tensor.dtype) : out->tensor.dtype;
  if (out->tensor.device_dtype != expected) return interface_error(error, p, "a device dtype that does not fit the target");
  uint32_t shape = nnx_json_get(j, value, "shape");
  if (shape == NNX_JSON_NONE || j->values[shape].kind != NNX_JSON_ARRAY || j->values[shape].length > NNX_MAX_RANK) {
    return interface_error(error, p, "a shape that is no list of at most 64 dimensions");
  }
  size_t rank = j->values[shape].length;
  out->shape = calloc(rank + 1, sizeof(int64_t));
  out->dims = calloc(rank + 1, sizeof(iree_hal_dim_t));
  if (!out->shape || !out->dims) return fail(error, NNX_ERROR_MEMORY, "out of memory");
  uint64_t count = 1;
  size_t i = 0;
  for (uint32_t d = j->values[shape].first; d != NNX_JSON_NONE; d = j->values[d].next, ++i) {
    if (j->values[d].kind == NNX_JSON_OBJECT) {  // {"dim": "b", "min": 1, "max": 64}: exported with symbolic_shape
      return fail(error, NNX_ERROR_ARTIFACT,
                  "%s: %s has a symbolic dimension; this library runs static shapes. For an app, export one static "
                  "function per size instead: method(..., buckets=(1, 8, 32)) (see docs/symbolic-shapes.md).",
                  p->directory, out->tensor.name);
    }
    if (nnx_json_integer(j, d, 0, MAX_DIMENSION, &out->shape[i])) return interface_error(error, p, "a bad dimension");
    out->dims[i] = (iree_hal_dim_t)out->shape[i];
    count *= (uint64_t)out->shape[i];
    if (count > MAX_TENSOR_BYTES) return interface_error(error, p, "a tensor too large");
  }
  out->tensor.rank = rank;
  out->tensor.shape = out->shape;
  out->tensor.element_count = (size_t)count;
  out->tensor.byte_length = (size_t)count * DTYPES[out->tensor.dtype].size;
  return NNX_OK;
}

static nnx_code_t read_tensors(const nnx_program_t *p, const nnx_json_t *j, uint32_t list, tensor_storage_t **storage,
                               nnx_tensor_t **views, size_t *count, nnx_error_t *error) {
  if (list == NNX_JSON_NONE || j->values[list].kind != NNX_JSON_ARRAY) return interface_error(error, p, "no tensor list");
  *count = j->values[list].length;
  *storage = calloc(*count + 1, sizeof(**storage));
  *views = calloc(*count + 1, sizeof(**views));
  if (!*storage || !*views) return fail(error, NNX_ERROR_MEMORY, "out of memory");
  size_t i = 0;
  for (uint32_t t = j->values[list].first; t != NNX_JSON_NONE; t = j->values[t].next, ++i) {
    nnx_code_t code = read_tensor(p, j, t, &(*storage)[i], error);
    if (code) return code;
    (*views)[i] = (*storage)[i].tensor;
  }
  return NNX_OK;
}

static nnx_code_t tampered(nnx_error_t *error, const nnx_program_t *p, const char *what) {
  return fail(error, NNX_ERROR_ARTIFACT,
              "%s/" MANIFEST " describes %s otherwise than " MODULE " records it (a variable's type, path or key, a "
              "function's inputs, outputs or their order): it was edited. Export the artifact again.",
              p->directory, what);
}

static nnx_code_t lookup_export(nnx_program_t *p, const char *name, iree_vm_function_t *out, nnx_error_t *error) {
  iree_status_t status = iree_vm_module_lookup_function_by_name(p->module, IREE_VM_FUNCTION_LINKAGE_EXPORT,
                                                                iree_make_cstring_view(name), out);
  if (!iree_status_is_ok(status)) {
    iree_status_ignore(status);
    return fail(error, NNX_ERROR_ARTIFACT, "%s/" MODULE " has no function '%s', which " MANIFEST " lists. Export again.",
                p->directory, name);
  }
  return NNX_OK;
}

// Reads the interface from nnx_get_state's reflection, checks the manifest against it, builds the tables.
static nnx_code_t learn_interface(nnx_program_t *p, nnx_json_t *iface, nnx_error_t *error) {
  nnx_code_t code = lookup_export(p, GET_STATE, &p->get_state, error);
  if (!code) code = lookup_export(p, SET_STATE, &p->set_state, error);
  if (code) return code;
  iree_string_view_t text = iree_vm_function_lookup_attr_by_name(&p->get_state, iree_make_cstring_view(INTERFACE_ATTRIBUTE));
  char message[256];
  if (text.size == 0 || nnx_json_parse(text.data, text.size, iface, message, sizeof(message)) != 0) {
    return interface_error(error, p, "no nnx.interface reflection, or not JSON");
  }
  const nnx_json_t *m = &p->manifest;
  uint32_t state = nnx_json_get(iface, 0, "state"), functions = nnx_json_get(iface, 0, "functions");
  if (state == NNX_JSON_NONE || functions == NNX_JSON_NONE || iface->values[functions].kind != NNX_JSON_OBJECT) {
    return interface_error(error, p, "no state or functions");
  }
  if (!nnx_json_equal(m, nnx_json_get(m, 0, "state"), iface, state)) return tampered(error, p, "the state");
  uint32_t manifest_functions = nnx_json_get(m, 0, "functions");
  if (m->values[manifest_functions].length != iface->values[functions].length) return tampered(error, p, "the functions");
  // The state, in the order of the module's globals.
  code = read_tensors(p, iface, state, &p->state, &p->state_views, &p->state_count, error);
  if (code) return code;
  p->state_globals = calloc(p->state_count + 1, sizeof(char *));
  if (!p->state_globals) return fail(error, NNX_ERROR_MEMORY, "out of memory");
  iree_string_view_t order = iree_vm_function_lookup_attr_by_name(&p->get_state, iree_make_cstring_view(STATE_ORDER_ATTRIBUTE));
  size_t at = 0;
  for (size_t i = 0; i < p->state_count; ++i) {
    uint32_t variable = nnx_json_item(iface, state, (uint32_t)i);
    size_t length;
    const char *global = nnx_json_string(iface, nnx_json_get(iface, variable, "global"), &length);
    if (!global || at + length > order.size || memcmp(order.data + at, global, length) != 0 ||
        (at + length < order.size && order.data[at + length] != ',')) {
      return interface_error(error, p, "the state globals are in another order than the interface lists them");
    }
    at += length + 1;
    p->state_globals[i] = (char *)global;
  }
  if (at < order.size || (p->state_count == 0 && order.size != 0)) return interface_error(error, p, "extra state globals");
  // The functions, in the manifest's (export) order.
  p->functions = calloc(m->values[manifest_functions].length + 1, sizeof(*p->functions));
  if (!p->functions) return fail(error, NNX_ERROR_MEMORY, "out of memory");
  for (uint32_t f = m->values[manifest_functions].first; f != NNX_JSON_NONE; f = m->values[f].next) {
    const char *name = m->strings + m->values[f].key;
    uint32_t recorded = nnx_json_get(iface, functions, name);
    if (recorded == NNX_JSON_NONE) return tampered(error, p, "the functions");
    for (int i = 0; INTERFACE_FIELDS[i]; ++i) {
      uint32_t a = nnx_json_get(m, f, INTERFACE_FIELDS[i]), b = nnx_json_get(iface, recorded, INTERFACE_FIELDS[i]);
      if (a == NNX_JSON_NONE || b == NNX_JSON_NONE || !nnx_json_equal(m, a, iface, b)) return tampered(error, p, name);
    }
    function_entry_t *entry = &p->functions[p->function_count++];
    entry->function.name = name;
    code = read_tensors(p, iface, nnx_json_get(iface, recorded, "inputs"), &entry->inputs, &entry->input_views,
                        &entry->function.input_count, error);
    if (!code) {
      code = read_tensors(p, iface, nnx_json_get(iface, recorded, "outputs"), &entry->outputs, &entry->output_views,
                          &entry->function.output_count, error);
    }
    if (code) return code;
    entry->function.inputs = entry->input_views, entry->function.outputs = entry->output_views;
    code = lookup_export(p, name, &entry->vm_function, error);
    if (code) return code;
  }
  // Which variables some function writes: nnx_set_state takes those; the others are immutable globals.
  // Only cpu modules have constant state (compile/runtime/_targets.py RuntimeTarget.constant_state).
  p->written = calloc(p->state_count + 1, 1);
  if (!p->written) return fail(error, NNX_ERROR_MEMORY, "out of memory");
  if (strcmp(p->target, "cpu") != 0) memset(p->written, 1, p->state_count), p->written_count = p->state_count;
  for (size_t f = 0; f < p->function_count; ++f) {
    uint32_t updates = nnx_json_get(iface, nnx_json_get(iface, functions, p->functions[f].function.name), "updates");
    if (updates == NNX_JSON_NONE || iface->values[updates].kind != NNX_JSON_ARRAY) return interface_error(error, p, "updates that are not a list");
    for (uint32_t u = iface->values[updates].first; u != NNX_JSON_NONE; u = iface->values[u].next) {
      size_t length;
      const char *name = nnx_json_string(iface, u, &length);
      ptrdiff_t index = name && strlen(name) == length ? state_index(p, name) : -1;
      if (index < 0) return interface_error(error, p, "a function updates a variable the state does not list");
      p->written_count += !p->written[index];
      p->written[index] = 1;
    }
  }
  // The module exports nothing else.
  iree_vm_module_signature_t signature = iree_vm_module_signature(p->module);
  for (iree_host_size_t i = 0; i < signature.export_function_count; ++i) {
    iree_vm_function_t function;
    if (!iree_status_is_ok(iree_vm_module_lookup_function_by_ordinal(p->module, IREE_VM_FUNCTION_LINKAGE_EXPORT, i, &function))) {
      return interface_error(error, p, "an unreadable export");
    }
    iree_string_view_t name = iree_vm_function_name(&function);
    char buffer[256];
    snprintf(buffer, sizeof(buffer), "%.*s", (int)name.size, name.data);
    if (strcmp(buffer, "__init") && strcmp(buffer, GET_STATE) && strcmp(buffer, SET_STATE) &&
        !nnx_program_find_function(p, buffer)) {
      return fail(error, NNX_ERROR_ARTIFACT, "%s/" MODULE " exports '%s', which " MANIFEST " does not list. Export again.",
                  p->directory, buffer);
    }
  }
  return NNX_OK;
}

// ---------------------------------------------------------------------------------------------------------
// Loading on a device.

static double max_flops(const nnx_program_t *p) {
  const nnx_json_t *m = &p->manifest;
  double best = 0;
  uint32_t functions = nnx_json_get(m, 0, "functions");
  for (uint32_t f = m->values[functions].first; f != NNX_JSON_NONE; f = m->values[f].next) {
    uint32_t flops = nnx_json_get(m, f, "flops");
    if (flops != NNX_JSON_NONE && m->values[flops].kind == NNX_JSON_NUMBER) {
      char text[64];
      snprintf(text, sizeof(text), "%.*s", (int)m->values[flops].length, m->input + m->values[flops].text);
      double value = strtod(text, NULL);
      if (value > best) best = value;
    }
  }
  return best;
}

static nnx_code_t pick_driver(nnx_program_t *p, const char *requested, nnx_error_t *error) {
  const char *allowed[3] = {NULL, NULL, NULL};
  if (strcmp(p->target, "cpu") == 0) {
    allowed[0] = max_flops(p) >= PARALLEL_MIN_FLOPS ? "local-task" : "local-sync";
    allowed[1] = strcmp(allowed[0], "local-sync") == 0 ? "local-task" : "local-sync";
  } else {
    allowed[0] = strcmp(p->target, "metal") == 0 ? "metal" : strcmp(p->target, "cuda") == 0 ? "cuda" : "vulkan";
  }
  const char *driver = requested ? requested : allowed[0];
  if (in_list(allowed, driver, strlen(driver)) < 0) {
    return fail(error, NNX_ERROR_DEVICE,
                "This artifact was compiled for '%s', which runs on the IREE driver(s) %s%s%s, not '%s'. Export for "
                "another target to run there.",
                p->target, allowed[0], allowed[1] ? ", " : "", allowed[1] ? allowed[1] : "", driver);
  }
  snprintf(p->driver, sizeof(p->driver), "%s", driver);
  return NNX_OK;
}

static pthread_once_t task_flags_once = PTHREAD_ONCE_INIT;
static void set_task_flags(void) {
  // local-task reads its worker stack size from IREE's flags when its first device is created.
  char flag[64];
  snprintf(flag, sizeof(flag), "--task_worker_stack_size=%d", TASK_WORKER_STACK);
  char program[] = "nnx_metal", *argv[] = {program, flag, NULL};
  int argc = 2;
  char **args = argv;
  iree_status_ignore(iree_flags_parse(IREE_FLAGS_PARSE_MODE_DEFAULT, &argc, &args));
}

// metal-vulkan kernels assume 16-lane subgroups (compile/runtime/_targets.py STANDIN_SUBGROUP_SIZE). Mesa's
// lavapipe names its vector width, "llvmpipe (LLVM 15.0.6, 512 bits)", and reads it from the environment
// when the Vulkan driver loads: refuse another width rather than compute wrong results.
#define STANDIN_SUBGROUP_SIZE 16

static nnx_code_t check_lavapipe_lanes(nnx_program_t *p, nnx_error_t *error) {
  iree_hal_driver_t *driver = NULL;
  iree_hal_device_info_t *infos = NULL;
  iree_host_size_t count = 0;
  iree_allocator_t host = iree_allocator_system();
  iree_status_t status = iree_hal_driver_registry_try_create(iree_runtime_instance_driver_registry(p->instance),
                                                             iree_make_cstring_view("vulkan"), host, &driver);
  if (iree_status_is_ok(status)) status = iree_hal_driver_query_available_devices(driver, host, &count, &infos);
  iree_status_ignore(status);
  int lanes = 0;
  for (iree_host_size_t i = 0; i < count && lanes == 0; ++i) {
    char name[256];
    snprintf(name, sizeof(name), "%.*s", (int)infos[i].name.size, infos[i].name.data);
    const char *comma = strncmp(name, "llvmpipe (LLVM ", 15) == 0 ? strchr(name, ',') : NULL;
    int bits = 0;
    if (comma && sscanf(comma, ", %d bits)", &bits) == 1) lanes = bits / 32;
  }
  iree_allocator_free(host, infos);
  iree_hal_driver_release(driver);
  if (lanes != 0 && lanes != STANDIN_SUBGROUP_SIZE) {
    return fail(error, NNX_ERROR_DEVICE,
                "These kernels assume %d-wide subgroups, but this lavapipe runs %d lanes. Start the program with "
                "LP_NATIVE_VECTOR_WIDTH=%d MESA_SHADER_CACHE_DISABLE=true in the environment (lavapipe reads them "
                "when it loads).",
                STANDIN_SUBGROUP_SIZE, lanes, STANDIN_SUBGROUP_SIZE * 32);
  }
  return NNX_OK;
}

static nnx_code_t open_device(nnx_program_t *p, nnx_error_t *error) {
  iree_allocator_t host = iree_allocator_system();
  iree_runtime_instance_options_t instance_options;
  iree_runtime_instance_options_initialize(&instance_options);
  iree_runtime_instance_options_use_all_available_drivers(&instance_options);
  iree_status_t status = iree_runtime_instance_create(&instance_options, host, &p->instance);
  if (!iree_status_is_ok(status)) return fail_status(error, NNX_ERROR_DEVICE, status, "Cannot start IREE's runtime");
  if (strcmp(p->driver, "local-task") == 0) pthread_once(&task_flags_once, set_task_flags);
  if (strcmp(p->target, "metal-vulkan") == 0) {
    nnx_code_t code = check_lavapipe_lanes(p, error);
    if (code) return code;
  }
  status = iree_runtime_instance_try_create_default_device(p->instance, iree_make_cstring_view(p->driver), &p->device);
  if (!iree_status_is_ok(status)) {
    char what[128];
    snprintf(what, sizeof(what), "The IREE driver '%s' found no device here", p->driver);
    return fail_status(error, NNX_ERROR_DEVICE, status, what);
  }
  return NNX_OK;
}

// The parameters, parsed from the bytes whose hash was checked; one entry of the right size per state variable.
static nnx_code_t read_parameters(nnx_program_t *p, nnx_error_t *error) {
  iree_allocator_t host = iree_allocator_system();
  iree_status_t status = iree_io_parameter_index_create(host, &p->parameter_index);
  if (iree_status_is_ok(status)) {
    iree_byte_span_t span = iree_make_byte_span(p->params_bytes.data, p->params_bytes.size);
    status = iree_io_file_handle_wrap_host_allocation(IREE_IO_FILE_ACCESS_READ, span,
                                                      iree_io_file_handle_release_callback_null(), host,
                                                      &p->params_handle);
  }
  if (iree_status_is_ok(status)) status = iree_io_parse_irpa_index(p->params_handle, p->parameter_index, host);
  if (!iree_status_is_ok(status)) {
    return fail_status(error, NNX_ERROR_ARTIFACT, status, PARAMS " is not an IREE parameter archive");
  }
  if (iree_io_parameter_index_count(p->parameter_index) != p->state_count) {
    return fail(error, NNX_ERROR_ARTIFACT,
                "%s/" PARAMS " does not hold this program's state (%zu entries for %zu variables): it belongs to "
                "another export. Export the artifact again.",
                p->directory, (size_t)iree_io_parameter_index_count(p->parameter_index), p->state_count);
  }
  for (size_t i = 0; i < p->state_count; ++i) {
    const iree_io_parameter_index_entry_t *entry = NULL;
    iree_status_t found =
        iree_io_parameter_index_lookup(p->parameter_index, iree_make_cstring_view(p->state_globals[i]), &entry);
    int ok = iree_status_is_ok(found) && entry->type == IREE_IO_PARAMETER_INDEX_ENTRY_STORAGE_TYPE_FILE &&
             entry->length == p->state_views[i].byte_length;
    iree_status_ignore(found);
    if (!ok) {
      return fail(error, NNX_ERROR_ARTIFACT,
                  "%s/" PARAMS " does not hold %zu bytes for %s (%s): it belongs to another export. Export again.",
                  p->directory, p->state_views[i].byte_length, p->state_views[i].name,
                  nnx_dtype_name(p->state_views[i].dtype));
    }
  }
  return NNX_OK;
}

static nnx_code_t create_session(nnx_program_t *p, nnx_error_t *error) {
  iree_allocator_t host = iree_allocator_system();
  iree_vm_instance_t *vm = iree_runtime_instance_vm_instance(p->instance);
  iree_runtime_session_options_t options;
  iree_runtime_session_options_initialize(&options);
  iree_status_t status = iree_runtime_session_create_with_device(p->instance, &options, p->device, host, &p->session);
  iree_io_parameter_provider_t *provider = NULL;
  iree_vm_module_t *parameters = NULL;
  if (iree_status_is_ok(status)) {
    status = iree_io_parameter_index_provider_create(iree_make_cstring_view(PARAMETER_SCOPE), p->parameter_index,
                                                     IREE_IO_PARAMETER_INDEX_PROVIDER_DEFAULT_MAX_CONCURRENT_OPERATIONS,
                                                     host, &provider);
  }
  if (iree_status_is_ok(status)) status = iree_io_parameters_module_create(vm, 1, &provider, host, &parameters);
  if (iree_status_is_ok(status)) status = iree_runtime_session_append_module(p->session, parameters);
  iree_vm_module_release(parameters);
  iree_io_parameter_provider_release(provider);
  if (!iree_status_is_ok(status)) return fail_status(error, NNX_ERROR_DEVICE, status, "Cannot load the parameters");
  status = iree_runtime_session_append_module(p->session, p->module);
  if (!iree_status_is_ok(status)) {
    return fail_status(error, NNX_ERROR_ARTIFACT, status, "The module cannot be loaded on this device");
  }
  int32_t one = 1;
  iree_hal_buffer_params_t params = {.type = IREE_HAL_MEMORY_TYPE_DEVICE_LOCAL, .usage = IREE_HAL_BUFFER_USAGE_DEFAULT};
  status = iree_hal_buffer_view_allocate_buffer_copy(p->device, iree_runtime_session_device_allocator(p->session), 0,
                                                     NULL, IREE_HAL_ELEMENT_TYPE_SINT_32,
                                                     IREE_HAL_ENCODING_TYPE_DENSE_ROW_MAJOR, params,
                                                     iree_make_const_byte_span(&one, sizeof(one)), &p->flag);
  if (!iree_status_is_ok(status)) return fail_status(error, NNX_ERROR_DEVICE, status, "Cannot allocate on the device");
  for (size_t i = 0; i < p->function_count; ++i) {
    status = iree_runtime_call_initialize(p->session, p->functions[i].vm_function, &p->functions[i].call);
    if (!iree_status_is_ok(status)) return fail_status(error, NNX_ERROR_MEMORY, status, "Cannot prepare a call");
    p->functions[i].call_ready = 1;
  }
  return NNX_OK;
}

static int hex_digest(const char *text) { return text && strlen(text) == 64 && is_sha256(text, 64); }

nnx_code_t nnx_program_open(const char *directory, const nnx_open_options_t *options, nnx_program_t **out,
                            nnx_error_t *error) {
  if (error) error->code = NNX_OK, error->message[0] = '\0';
  if (!directory || !out) return fail(error, NNX_ERROR_ARGUMENT, "nnx_program_open needs a directory and an out pointer");
  *out = NULL;
  nnx_open_options_t defaults = {NULL, NULL};
  if (!options) options = &defaults;
  if (options->digest && !hex_digest(options->digest)) {
    return fail(error, NNX_ERROR_ARGUMENT, "The digest must be 64 lowercase hex digits (the artifact's sha256 of " MANIFEST ").");
  }
  nnx_program_t *p = calloc(1, sizeof(*p));
  if (!p) return fail(error, NNX_ERROR_MEMORY, "out of memory");
  pthread_mutex_init(&p->lock, NULL);
  p->directory = strdup(directory);
  nnx_code_t code = NNX_OK;
  int directory_fd = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (directory_fd < 0) {
    code = fail(error, NNX_ERROR_ARTIFACT, "%s is not an nnx-metal artifact: %s.", directory,
                errno == ENOENT ? "it does not exist" : errno == ENOTDIR ? "it is not a directory" : strerror(errno));
    goto done;
  }
  // A shared lock on the parent, as Python's reader holds: one save's files, not half of two.
  char *parent_path = strdup(directory);
  char *slash = parent_path ? strrchr(parent_path, '/') : NULL;
  int parent_fd = -1;
  if (parent_path) {
    if (slash) *(slash == parent_path ? slash + 1 : slash) = '\0';
    parent_fd = open(slash ? parent_path : ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (parent_fd >= 0) flock(parent_fd, LOCK_SH);
  }
  free(parent_path);
  file_bytes_t manifest;
  code = read_file(directory_fd, directory, MANIFEST, NNX_JSON_MAX_BYTES, &manifest, error);
  if (!code) {
    p->manifest_text = (char *)manifest.data;
    nnx_sha256_hex(manifest.data, manifest.size, p->digest);
    if (options->digest && strcmp(options->digest, p->digest) != 0) {
      code = fail(error, NNX_ERROR_DIGEST, "%s is not the artifact of digest %s: its " MANIFEST " has another.", directory,
                  options->digest);
    }
  }
  char message[256];
  if (!code && nnx_json_parse(p->manifest_text, manifest.size, &p->manifest, message, sizeof(message)) != 0) {
    code = fail(error, NNX_ERROR_ARTIFACT, "%s/" MANIFEST " is not valid JSON (%s). The artifact is corrupt; export it again.",
                directory, message);
  }
  if (!code) code = read_files(p, directory_fd, error);
  if (parent_fd >= 0) close(parent_fd);  // releases the lock
  close(directory_fd);
  if (!code) code = check_manifest(p, error);
  if (!code) code = check_versions(p, error);
  if (!code) code = pick_driver(p, options->driver, error);
  if (!code) code = open_device(p, error);
  if (!code) {
    iree_status_t status = iree_vm_bytecode_module_create(
        iree_runtime_instance_vm_instance(p->instance), IREE_VM_BYTECODE_MODULE_FLAG_NONE,
        iree_make_const_byte_span(p->module_bytes.data, p->module_bytes.size), iree_allocator_null(),
        iree_allocator_system(), &p->module);
    if (!iree_status_is_ok(status)) {
      code = fail_status(error, NNX_ERROR_ARTIFACT, status,
                         MODULE " is not a module this runtime can read (an IREE runtime of another release needs "
                                "another compiler: see NNX_METAL_IREE_COMPILER_RELEASE)");
    }
  }
  if (!code) code = learn_interface(p, &p->interface, error);
  if (!code) code = read_parameters(p, error);
  if (!code) code = create_session(p, error);
done:
  if (code) {
    nnx_program_close(p);
    return code;
  }
  *out = p;
  return NNX_OK;
}

// ---------------------------------------------------------------------------------------------------------
// Moving arrays between the host and the device.

static int is_entry(const nnx_program_t *p, const nnx_function_t *function) {
  for (size_t i = 0; i < p->function_count; ++i) {
    if (&p->functions[i].function == function) return 1;
  }
  return 0;
}

static nnx_code_t to_device(nnx_program_t *p, const tensor_storage_t *t, const void *data, iree_hal_buffer_view_t **out,
                            nnx_error_t *error) {
  const nnx_tensor_t *tensor = &t->tensor;
  size_t device_bytes = tensor->element_count * DTYPES[tensor->device_dtype].size;
  void *converted = NULL;
  if (tensor->device_dtype != tensor->dtype) {
    converted = malloc(device_bytes ? device_bytes : 1);
    if (!converted) return fail(error, NNX_ERROR_MEMORY, "out of memory converting %s", tensor->name);
    convert(data, tensor->dtype, converted, tensor->device_dtype, tensor->element_count);
    data = converted;
  }
  iree_hal_buffer_params_t params = {.type = IREE_HAL_MEMORY_TYPE_DEVICE_LOCAL, .usage = IREE_HAL_BUFFER_USAGE_DEFAULT};
  iree_status_t status = iree_hal_buffer_view_allocate_buffer_copy(
      p->device, iree_runtime_session_device_allocator(p->session), tensor->rank, t->dims,
      DTYPES[tensor->device_dtype].hal, IREE_HAL_ENCODING_TYPE_DENSE_ROW_MAJOR, params,
      iree_make_const_byte_span(data, device_bytes), out);
  free(converted);
  if (!iree_status_is_ok(status)) return fail_status(error, NNX_ERROR_DEVICE, status, "Cannot copy an input to the device");
  return NNX_OK;
}

// Copies a device result into `data` after checking it is what the interface promises: a wrong module
// cannot make the library read past a buffer.
static nnx_code_t to_host(nnx_program_t *p, iree_hal_buffer_view_t *view, const tensor_storage_t *t, void *data,
                          nnx_error_t *error) {
  const nnx_tensor_t *tensor = &t->tensor;
  size_t device_bytes = tensor->element_count * DTYPES[tensor->device_dtype].size;
  int matches = view && accepts(tensor->device_dtype, iree_hal_buffer_view_element_type(view)) &&
                iree_hal_buffer_view_shape_rank(view) == tensor->rank &&
                iree_hal_buffer_view_byte_length(view) == device_bytes;
  for (size_t i = 0; matches && i < tensor->rank; ++i) matches = iree_hal_buffer_view_shape_dim(view, i) == t->dims[i];
  iree_hal_buffer_t *buffer = matches ? iree_hal_buffer_view_buffer(view) : NULL;
  if (!buffer || iree_hal_buffer_byte_length(buffer) < device_bytes) {
    return fail(error, NNX_ERROR_ARTIFACT,
                "The module returned another array than its interface promises for %s (%s, %zu bytes). Export again.",
                tensor->name, nnx_dtype_name(tensor->device_dtype), device_bytes);
  }
  void *target = data, *converted = NULL;
  if (tensor->device_dtype != tensor->dtype) {
    converted = target = malloc(device_bytes ? device_bytes : 1);
    if (!converted) return fail(error, NNX_ERROR_MEMORY, "out of memory reading %s", tensor->name);
  }
  iree_status_t status = iree_ok_status();
  if (device_bytes > 0) {
    // Host-visible results (local-sync, local-task) are read in place; others (Vulkan) are staged by IREE.
    int mappable = iree_all_bits_set(iree_hal_buffer_memory_type(buffer), IREE_HAL_MEMORY_TYPE_HOST_VISIBLE) &&
                   iree_all_bits_set(iree_hal_buffer_allowed_usage(buffer), IREE_HAL_BUFFER_USAGE_MAPPING_SCOPED);
    status = mappable ? iree_hal_buffer_map_read(buffer, 0, target, device_bytes)
                      : iree_hal_device_transfer_d2h(p->device, buffer, 0, target, device_bytes,
                                                     IREE_HAL_TRANSFER_BUFFER_FLAG_DEFAULT, iree_infinite_timeout());
  }
  if (iree_status_is_ok(status) && converted) convert(converted, tensor->device_dtype, data, tensor->dtype, tensor->element_count);
  free(converted);
  if (!iree_status_is_ok(status)) return fail_status(error, NNX_ERROR_DEVICE, status, "Cannot copy a result from the device");
  return NNX_OK;
}

nnx_code_t nnx_program_call(nnx_program_t *p, const nnx_function_t *function, const void *const *inputs,
                            void *const *outputs, nnx_error_t *error) {
  if (!p || !function || !is_entry(p, function)) {
    return fail(error, NNX_ERROR_SIGNATURE, "nnx_program_call: the function is not one of this program's");
  }
  function_entry_t *entry = (function_entry_t *)function;  // the public view is the entry's first member
  for (size_t i = 0; i < function->input_count; ++i) {
    if (!inputs || !inputs[i]) return fail(error, NNX_ERROR_ARGUMENT, "%s: input %zu is NULL", function->name, i);
  }
  for (size_t i = 0; i < function->output_count; ++i) {
    if (!outputs || !outputs[i]) return fail(error, NNX_ERROR_ARGUMENT, "%s: output %zu is NULL", function->name, i);
  }
  pthread_mutex_lock(&p->lock);
  nnx_code_t code = NNX_OK;
  iree_runtime_call_reset(&entry->call);
  for (size_t i = 0; i < function->input_count && !code; ++i) {
    iree_hal_buffer_view_t *view = NULL;
    code = to_device(p, &entry->inputs[i], inputs[i], &view, error);
    if (!code) {
      iree_status_t status = iree_runtime_call_inputs_push_back_buffer_view(&entry->call, view);
      if (!iree_status_is_ok(status)) code = fail_status(error, NNX_ERROR_MEMORY, status, "Cannot pass an input");
    }
    iree_hal_buffer_view_release(view);
  }
  if (!code) {
    iree_status_t status = iree_runtime_call_invoke(&entry->call, 0);
    if (!iree_status_is_ok(status)) {
      char what[160];
      snprintf(what, sizeof(what), "%s failed on the device", function->name);
      code = fail_status(error, NNX_ERROR_EXECUTION, status, what);
    }
  }
  if (!code && iree_vm_list_size(iree_runtime_call_outputs(&entry->call)) != function->output_count) {
    code = fail(error, NNX_ERROR_ARTIFACT, "%s returned %zu results; its interface promises %zu. Export again.",
                function->name, (size_t)iree_vm_list_size(iree_runtime_call_outputs(&entry->call)), function->output_count);
  }
  for (size_t i = 0; i < function->output_count && !code; ++i) {
    iree_hal_buffer_view_t *view = iree_vm_list_get_buffer_view_assign(iree_runtime_call_outputs(&entry->call), i);
    code = to_host(p, view, &entry->outputs[i], outputs[i], error);
  }
  iree_runtime_call_reset(&entry->call);  // releases the results now, not at the next call
  pthread_mutex_unlock(&p->lock);
  return code;
}

// ---------------------------------------------------------------------------------------------------------
// State: nnx_get_state(1) returns every global; nnx_set_state(1, *values) replaces those some function writes.

static nnx_code_t call_state_function(nnx_program_t *p, iree_vm_function_t *function, iree_vm_list_t *inputs,
                                      iree_vm_list_t **outputs, nnx_error_t *error) {
  iree_status_t status = iree_vm_list_create(iree_vm_make_undefined_type_def(), p->state_count, iree_allocator_system(), outputs);
  if (iree_status_is_ok(status)) status = iree_runtime_session_call(p->session, function, inputs, *outputs);
  if (!iree_status_is_ok(status)) return fail_status(error, NNX_ERROR_EXECUTION, status, "The state functions failed");
  return NNX_OK;
}

// Every state global as buffer views on the device, in order, in *views (release it).
static nnx_code_t device_state(nnx_program_t *p, iree_vm_list_t **views, nnx_error_t *error) {
  iree_vm_list_t *inputs = NULL;
  *views = NULL;
  iree_status_t status = iree_vm_list_create(iree_vm_make_undefined_type_def(), 1, iree_allocator_system(), &inputs);
  if (iree_status_is_ok(status)) {
    iree_vm_ref_t flag = iree_hal_buffer_view_retain_ref(p->flag);
    status = iree_vm_list_push_ref_move(inputs, &flag);
  }
  nnx_code_t code = iree_status_is_ok(status) ? call_state_function(p, &p->get_state, inputs, views, error)
                                              : fail_status(error, NNX_ERROR_MEMORY, status, "Cannot call nnx_get_state");
  iree_vm_list_release(inputs);
  if (!code && iree_vm_list_size(*views) != p->state_count) {
    code = fail(error, NNX_ERROR_ARTIFACT, GET_STATE " returned %zu values for %zu state variables. Export again.",
                (size_t)iree_vm_list_size(*views), p->state_count);
  }
  return code;
}

static nnx_code_t check_state_access(nnx_program_t *p, const char *name, const void *data, size_t byte_length,
                                     ptrdiff_t *index, nnx_error_t *error) {
  if (!p || !data) return fail(error, NNX_ERROR_ARGUMENT, "a NULL program or buffer");
  *index = state_index(p, name);
  if (*index < 0) {
    return fail(error, NNX_ERROR_STATE,
                "This program has no state variable '%.200s' (names are NNX paths joined with dots, e.g. '%s'; a program "
                "exported from a dict of objects starts them with its keys).",
                name ? name : "(null)", p->state_count ? p->state_views[0].name : "model.linear.kernel");
  }
  const nnx_tensor_t *v = &p->state_views[*index];
  if (byte_length != v->byte_length) {
    return fail(error, NNX_ERROR_STATE, "State variable %s is %s with %zu elements (%zu bytes); got %zu bytes.", v->name,
                nnx_dtype_name(v->dtype), v->element_count, v->byte_length, byte_length);
  }
  return NNX_OK;
}

nnx_code_t nnx_program_read_state(nnx_program_t *p, const char *name, void *data, size_t byte_length, nnx_error_t *error) {
  ptrdiff_t i = -1;
  nnx_code_t code = check_state_access(p, name, data, byte_length, &i, error);
  if (code) return code;
  pthread_mutex_lock(&p->lock);
  iree_vm_list_t *views = NULL;
  code = device_state(p, &views, error);
  if (!code) code = to_host(p, iree_vm_list_get_buffer_view_assign(views, (iree_host_size_t)i), &p->state[i], data, error);
  iree_vm_list_release(views);
  pthread_mutex_unlock(&p->lock);
  return code;
}

// Every state variable's value in one host buffer, each in its own dtype at offsets[i] (64-byte aligned):
// *values (free it), offsets (state_count entries), *total bytes.
static nnx_code_t host_state(nnx_program_t *p, uint8_t **values, size_t *offsets, size_t *total, nnx_error_t *error) {
  *values = NULL, *total = 0;
  for (size_t i = 0; i < p->state_count; ++i) offsets[i] = *total, *total += (p->state_views[i].byte_length + 63) & ~(size_t)63;
  iree_vm_list_t *views = NULL;
  nnx_code_t code = posix_memalign((void **)values, 64, *total ? *total : 1) ? fail(error, NNX_ERROR_MEMORY, "out of memory")
                                                                             : device_state(p, &views, error);
  for (size_t i = 0; i < p->state_count && !code; ++i) {
    code = to_host(p, iree_vm_list_get_buffer_view_assign(views, i), &p->state[i], *values + offsets[i], error);
  }
  iree_vm_list_release(views);
  if (code) free(*values), *values = NULL;
  return code;
}

// An index of every state variable at offsets[i] of `handle`, under its global's name.
static iree_status_t state_index_of(nnx_program_t *p, iree_io_file_handle_t *handle, const size_t *offsets,
                                    iree_io_parameter_index_t **out) {
  iree_status_t status = iree_io_parameter_index_create(iree_allocator_system(), out);
  for (size_t i = 0; i < p->state_count && iree_status_is_ok(status); ++i) {
    iree_io_parameter_index_entry_t entry = {0};
    entry.key = iree_make_cstring_view(p->state_globals[i]);
    entry.length = p->state_views[i].byte_length;
    entry.type = IREE_IO_PARAMETER_INDEX_ENTRY_STORAGE_TYPE_FILE;
    entry.storage.file.handle = handle;
    entry.storage.file.offset = offsets[i];
    status = iree_io_parameter_index_add(*out, &entry);
  }
  return status;
}

static void free_values(void *user_data, iree_io_file_handle_primitive_t primitive) {
  (void)primitive;
  free(user_data);
}

static void release_calls(nnx_program_t *p) {
  for (size_t i = 0; i < p->function_count; ++i) {
    if (p->functions[i].call_ready) iree_runtime_call_deinitialize(&p->functions[i].call);
    p->functions[i].call_ready = 0;
  }
}

// Loads the module again, its globals initialized from `values` (every variable at offsets[i], as host_state
// gives them; takes ownership). A variable no function writes is an immutable global, which nnx_set_state
// cannot store: IREE computed what depends on it (transposed or re-packed weights) once, at load, so a new
// value means a new load. All or nothing: if the new session fails, the old one stays.
static nnx_code_t reload(nnx_program_t *p, uint8_t *values, const size_t *offsets, size_t total, nnx_error_t *error) {
  iree_io_file_handle_t *handle = NULL;
  iree_io_parameter_index_t *index = NULL;
  iree_io_file_handle_release_callback_t release = {free_values, values};
  iree_status_t status = iree_io_file_handle_wrap_host_allocation(
      IREE_IO_FILE_ACCESS_READ, iree_make_byte_span(values, total), release, iree_allocator_system(), &handle);
  if (!iree_status_is_ok(status)) free(values);
  if (iree_status_is_ok(status)) status = state_index_of(p, handle, offsets, &index);
  if (!iree_status_is_ok(status)) {
    iree_io_parameter_index_release(index);
    iree_io_file_handle_release(handle);
    return fail_status(error, NNX_ERROR_MEMORY, status, "Cannot hold the new state");
  }
  iree_runtime_session_t *old_session = p->session;
  iree_hal_buffer_view_t *old_flag = p->flag;
  iree_io_parameter_index_t *old_index = p->parameter_index;
  iree_io_file_handle_t *old_handle = p->params_handle;
  release_calls(p);
  p->session = NULL, p->flag = NULL, p->parameter_index = index, p->params_handle = handle;
  nnx_code_t code = create_session(p, error);
  if (code) {  // back to the old session
    release_calls(p);
    iree_hal_buffer_view_release(p->flag);
    iree_runtime_session_release(p->session);
    p->session = old_session, p->flag = old_flag, p->parameter_index = old_index, p->params_handle = old_handle;
    for (size_t i = 0; i < p->function_count; ++i) {
      iree_status_ignore(iree_runtime_call_initialize(p->session, p->functions[i].vm_function, &p->functions[i].call));
      p->functions[i].call_ready = 1;
    }
    old_index = index, old_handle = handle, old_session = NULL, old_flag = NULL;
  }
  iree_hal_buffer_view_release(old_flag);
  iree_runtime_session_release(old_session);
  iree_io_parameter_index_release(old_index);
  iree_io_file_handle_release(old_handle);
  if (!code) {  // nothing refers to the archive read at open any more
    free(p->params_bytes.data);
    p->params_bytes.data = NULL, p->params_bytes.size = 0;
  }
  return code;
}

// A variable some function writes: nnx_set_state(1, *written values), the replacement at `index`.
static nnx_code_t set_written(nnx_program_t *p, ptrdiff_t index, const void *data, nnx_error_t *error) {
  iree_vm_list_t *views = NULL, *inputs = NULL, *none = NULL;
  iree_hal_buffer_view_t *replacement = NULL;
  nnx_code_t code = device_state(p, &views, error);
  if (!code) code = to_device(p, &p->state[index], data, &replacement, error);
  if (!code) {
    iree_status_t status =
        iree_vm_list_create(iree_vm_make_undefined_type_def(), p->written_count + 1, iree_allocator_system(), &inputs);
    if (iree_status_is_ok(status)) {
      iree_vm_ref_t flag = iree_hal_buffer_view_retain_ref(p->flag);
      status = iree_vm_list_push_ref_move(inputs, &flag);
    }
    for (size_t j = 0; j < p->state_count && iree_status_is_ok(status); ++j) {
      if (!p->written[j]) continue;
      iree_hal_buffer_view_t *value = (ptrdiff_t)j == index ? replacement : iree_vm_list_get_buffer_view_assign(views, j);
      iree_vm_ref_t ref = iree_hal_buffer_view_retain_ref(value);
      status = iree_vm_list_push_ref_move(inputs, &ref);
    }
    code = iree_status_is_ok(status) ? call_state_function(p, &p->set_state, inputs, &none, error)
                                     : fail_status(error, NNX_ERROR_MEMORY, status, "Cannot call nnx_set_state");
  }
  iree_vm_list_release(none);
  iree_vm_list_release(inputs);
  iree_hal_buffer_view_release(replacement);
  iree_vm_list_release(views);
  return code;
}

// A variable no function writes: the module loaded again with the new value (nothing to do if it is the same).
static nnx_code_t set_constant(nnx_program_t *p, ptrdiff_t index, const void *data, nnx_error_t *error) {
  size_t *offsets = calloc(p->state_count + 1, sizeof(size_t)), total = 0;
  uint8_t *values = NULL;
  if (!offsets) return fail(error, NNX_ERROR_MEMORY, "out of memory");
  nnx_code_t code = host_state(p, &values, offsets, &total, error);
  if (!code) {
    size_t length = p->state_views[index].byte_length;
    if (memcmp(values + offsets[index], data, length) == 0) {
      free(values);
    } else {
      memcpy(values + offsets[index], data, length);
      code = reload(p, values, offsets, total, error);
    }
  }
  free(offsets);
  return code;
}

nnx_code_t nnx_program_write_state(nnx_program_t *p, const char *name, const void *data, size_t byte_length,
                                   nnx_error_t *error) {
  ptrdiff_t i = -1;
  nnx_code_t code = check_state_access(p, name, data, byte_length, &i, error);
  if (code) return code;
  pthread_mutex_lock(&p->lock);
  code = p->written[i] ? set_written(p, i, data, error) : set_constant(p, i, data, error);
  pthread_mutex_unlock(&p->lock);
  return code;
}

// ---------------------------------------------------------------------------------------------------------
// Saving: the same files, a new params.irpa holding the device state, and the manifest with its new hash.

typedef struct text_buffer {
  char *data;
  size_t size, capacity;
  int failed;
} text_buffer_t;

static void put(text_buffer_t *b, const char *text, size_t length) {
  if (b->failed) return;
  if (b->size + length + 1 > b->capacity) {
    size_t capacity = (b->size + length + 1) * 2;
    char *data = realloc(b->data, capacity);
    if (!data) {
      b->failed = 1;
      return;
    }
    b->data = data, b->capacity = capacity;
  }
  memcpy(b->data + b->size, text, length);
  b->size += length;
  b->data[b->size] = '\0';
}

static void put_string(text_buffer_t *b, const char *text, size_t length) {
  put(b, "\"", 1);
  for (size_t i = 0; i < length; ++i) {
    unsigned char c = (unsigned char)text[i];
    if (c == '"' || c == '\\') {
      char escaped[2] = {'\\', (char)c};
      put(b, escaped, 2);
    } else if (c < 0x20) {
      char escaped[8];
      snprintf(escaped, sizeof(escaped), "\\u%04x", c);
      put(b, escaped, 6);
    } else {
      put(b, (const char *)&text[i], 1);  // UTF-8 passes through as it was read (checked well-formed)
    }
  }
  put(b, "\"", 1);
}

// Writes `value` as JSON, with the value at `replace` written as the string `replacement` instead.
static void put_json(text_buffer_t *b, const nnx_json_t *j, uint32_t value, uint32_t replace, const char *replacement) {
  const nnx_json_value_t *v = &j->values[value];
  if (value == replace) {
    put_string(b, replacement, strlen(replacement));
    return;
  }
  switch (v->kind) {
    case NNX_JSON_NULL:
      put(b, "null", 4);
      break;
    case NNX_JSON_TRUE:
      put(b, "true", 4);
      break;
    case NNX_JSON_FALSE:
      put(b, "false", 5);
      break;
    case NNX_JSON_NUMBER:
      put(b, j->input + v->text, v->length);
      break;
    case NNX_JSON_STRING:
      put_string(b, j->strings + v->text, v->length);
      break;
    default: {
      int object = v->kind == NNX_JSON_OBJECT;
      put(b, object ? "{" : "[", 1);
      for (uint32_t c = v->first; c != NNX_JSON_NONE; c = j->values[c].next) {
        if (c != v->first) put(b, ",", 1);
        if (object) {
          put_string(b, j->strings + j->values[c].key, j->values[c].key_length);
          put(b, ":", 1);
        }
        put_json(b, j, c, replace, replacement);
      }
      put(b, object ? "}" : "]", 1);
    }
  }
}

typedef struct archive_memory {
  uint8_t *data;
  size_t size;
} archive_memory_t;

static iree_status_t open_archive(void *user_data, iree_io_physical_offset_t offset, iree_io_physical_size_t length,
                                  iree_io_file_handle_t **out) {
  archive_memory_t *memory = (archive_memory_t *)user_data;
  (void)offset;
  if (posix_memalign((void **)&memory->data, 4096, (size_t)length ? (size_t)length : 1) != 0) {
    memory->data = NULL;
    return iree_make_status(IREE_STATUS_RESOURCE_EXHAUSTED, "archive of %" PRIu64 " bytes", (uint64_t)length);
  }
  memset(memory->data, 0, (size_t)length);
  memory->size = (size_t)length;
  return iree_io_file_handle_wrap_host_allocation(IREE_IO_FILE_ACCESS_READ | IREE_IO_FILE_ACCESS_WRITE,
                                                  iree_make_byte_span(memory->data, (size_t)length),
                                                  iree_io_file_handle_release_callback_null(), iree_allocator_system(),
                                                  out);
}

// The device state as a parameter archive in memory (each variable in its own dtype, as Python saves it).
static nnx_code_t build_archive(nnx_program_t *p, archive_memory_t *archive, nnx_error_t *error) {
  size_t *offsets = calloc(p->state_count + 1, sizeof(size_t)), total = 0;
  if (!offsets) return fail(error, NNX_ERROR_MEMORY, "out of memory");
  uint8_t *values = NULL;
  iree_io_file_handle_t *handle = NULL;
  iree_io_parameter_index_t *source = NULL, *target = NULL;
  nnx_code_t code = host_state(p, &values, offsets, &total, error);
  iree_allocator_t host = iree_allocator_system();
  iree_status_t status = iree_ok_status();
  if (!code) {
    status = iree_io_file_handle_wrap_host_allocation(IREE_IO_FILE_ACCESS_READ, iree_make_byte_span(values, total),
                                                      iree_io_file_handle_release_callback_null(), host, &handle);
    if (iree_status_is_ok(status)) status = state_index_of(p, handle, offsets, &source);
    if (iree_status_is_ok(status)) status = iree_io_parameter_index_create(host, &target);
    iree_io_parameter_archive_file_open_callback_t open = {open_archive, archive};
    if (iree_status_is_ok(status)) status = iree_io_build_parameter_archive(source, target, open, 0, host);
    if (!iree_status_is_ok(status)) code = fail_status(error, NNX_ERROR_MEMORY, status, "Cannot build " PARAMS);
  }
  iree_io_parameter_index_release(target);
  iree_io_parameter_index_release(source);
  iree_io_file_handle_release(handle);
  free(values);
  free(offsets);
  return code;
}

static int write_all(int directory_fd, const char *relative, const void *data, size_t size) {
  int fd = openat(directory_fd, relative, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
  if (fd < 0) return -1;
  size_t done = 0;
  while (done < size) {
    ssize_t wrote = write(fd, (const uint8_t *)data + done, size - done);
    if (wrote < 0 && errno == EINTR) continue;
    if (wrote <= 0) break;
    done += (size_t)wrote;
  }
  int ok = done == size && fsync(fd) == 0;
  return close(fd) == 0 && ok ? 0 : -1;
}

static void remove_tree(const char *path, nnx_program_t *p) {
  char file[4096];
  for (size_t i = 0; i < p->file_count; ++i) {
    snprintf(file, sizeof(file), "%s/%s", path, p->file_names[i]);
    unlink(file);
  }
  snprintf(file, sizeof(file), "%s/" MANIFEST, path), unlink(file);
  snprintf(file, sizeof(file), "%s/msl", path), rmdir(file);
  snprintf(file, sizeof(file), "%s/spirv", path), rmdir(file);
  rmdir(path);
}

nnx_code_t nnx_program_save(nnx_program_t *p, const char *directory, nnx_error_t *error) {
  if (!p || !directory || !*directory) return fail(error, NNX_ERROR_ARGUMENT, "nnx_program_save needs a program and a directory");
  struct stat info;
  if (lstat(directory, &info) == 0) {
    return fail(error, NNX_ERROR_ARGUMENT, "%s exists; nothing was written. Save into a new directory.", directory);
  }
  char tmp[4096];
  const char *slash = strrchr(directory, '/');
  int parent_length = slash ? (int)(slash - directory) + 1 : 0;
  // Python's next save into the same folder removes such a temporary if this process was killed (_files.py).
  snprintf(tmp, sizeof(tmp), "%.*s.%s.tmp-%ld-%lx", parent_length, directory, slash ? slash + 1 : directory,
           (long)getpid(), (unsigned long)random());
  pthread_mutex_lock(&p->lock);
  archive_memory_t archive = {NULL, 0};
  text_buffer_t manifest = {0};
  int tmp_fd = -1, source_fd = -1;
  nnx_code_t code = build_archive(p, &archive, error);
  if (!code && mkdir(tmp, 0755) != 0) code = fail(error, NNX_ERROR_IO, "Cannot create %s: %s", tmp, strerror(errno));
  if (!code) {
    tmp_fd = open(tmp, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    source_fd = open(p->directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (tmp_fd < 0 || source_fd < 0) code = fail(error, NNX_ERROR_IO, "Cannot open %s or %s", tmp, p->directory);
  }
  // Every other file, read again from the artifact and checked against the hash it was opened with.
  for (size_t i = 0; i < p->file_count && !code; ++i) {
    const char *relative = p->file_names[i];
    if (strcmp(relative, PARAMS) == 0) continue;
    file_bytes_t bytes = {NULL, 0};
    if (strcmp(relative, MODULE) != 0) {
      code = read_file(source_fd, p->directory, relative, (size_t)1 << 40, &bytes, error);
      char actual[65];
      if (!code) nnx_sha256_hex(bytes.data, bytes.size, actual);
      if (!code && strcmp(actual, p->file_hashes[i]) != 0) {
        code = fail(error, NNX_ERROR_ARTIFACT, "%s/%s changed since the program was opened; nothing was saved.",
                    p->directory, relative);
      }
    }
    const char *folder_end = strchr(relative, '/');
    if (!code && folder_end) {
      char folder[16];
      snprintf(folder, sizeof(folder), "%.*s", (int)(folder_end - relative), relative);
      if (mkdirat(tmp_fd, folder, 0755) != 0 && errno != EEXIST) code = fail(error, NNX_ERROR_IO, "Cannot create %s/%s", tmp, folder);
    }
    const file_bytes_t *data = strcmp(relative, MODULE) == 0 ? &p->module_bytes : &bytes;
    if (!code && write_all(tmp_fd, relative, data->data, data->size) != 0) {
      code = fail(error, NNX_ERROR_IO, "Cannot write %s/%s: %s", tmp, relative, strerror(errno));
    }
    free(bytes.data);
  }
  char hash[65];
  if (!code) {
    nnx_sha256_hex(archive.data, archive.size, hash);
    if (write_all(tmp_fd, PARAMS, archive.data, archive.size) != 0) code = fail(error, NNX_ERROR_IO, "Cannot write " PARAMS);
  }
  if (!code) {
    uint32_t files = nnx_json_get(&p->manifest, 0, "files");
    put_json(&manifest, &p->manifest, 0, nnx_json_get(&p->manifest, files, PARAMS), hash);
    put(&manifest, "\n", 1);
    if (manifest.failed) code = fail(error, NNX_ERROR_MEMORY, "out of memory writing " MANIFEST);
  }
  if (!code && write_all(tmp_fd, MANIFEST, manifest.data, manifest.size) != 0) {
    code = fail(error, NNX_ERROR_IO, "Cannot write " MANIFEST);
  }
  if (!code && rename(tmp, directory) != 0) code = fail(error, NNX_ERROR_IO, "Cannot rename %s to %s: %s", tmp, directory, strerror(errno));
  if (code) remove_tree(tmp, p);
  if (tmp_fd >= 0) close(tmp_fd);
  if (source_fd >= 0) close(source_fd);
  free(manifest.data);
  free(archive.data);
  pthread_mutex_unlock(&p->lock);
  return code;
}
