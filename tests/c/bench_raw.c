// bench_raw: the per-call time of a raw IREE invoke of one function, with no nnx-metal library in
// between: the baseline nnx_models/tools/bench_c.py compares the C library's calls with.
//
//   bench_raw MODULE PARAMS DRIVER MODULE_NAME.FUNCTION N SHAPE...   SHAPE: 8x2 or scalar (float32, 0.5)
//
// Per call, as the library does: copy each input to the device, invoke, copy each output to the host.
// Prints "microseconds_per_call X".
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "iree/base/tooling/flags.h"
#include "iree/io/file_handle.h"
#include "iree/io/formats/irpa/irpa_parser.h"
#include "iree/io/parameter_index.h"
#include "iree/io/parameter_index_provider.h"
#include "iree/modules/hal/types.h"
#include "iree/modules/io/parameters/module.h"
#include "iree/runtime/api.h"

#define CHECK(expr)                                         \
  do {                                                      \
    iree_status_t status_ = (expr);                         \
    if (!iree_status_is_ok(status_)) {                      \
      iree_status_fprint(stderr, status_);                  \
      return 1;                                             \
    }                                                       \
  } while (0)

int main(int argc, char **argv) {
  if (argc < 6) {
    fprintf(stderr, "usage: bench_raw MODULE PARAMS DRIVER FUNCTION N SHAPE...\n");
    return 2;
  }
  iree_allocator_t host = iree_allocator_system();
  // As the library does: local-task's workers get 1 MiB of stack (cpu kernels may take 128 KiB).
  char flag[] = "--task_worker_stack_size=1048576", program[] = "bench_raw", *flag_argv[] = {program, flag, NULL};
  int flag_argc = 2;
  char **flag_args = flag_argv;
  CHECK(iree_flags_parse(IREE_FLAGS_PARSE_MODE_DEFAULT, &flag_argc, &flag_args));
  iree_runtime_instance_options_t instance_options;
  iree_runtime_instance_options_initialize(&instance_options);
  iree_runtime_instance_options_use_all_available_drivers(&instance_options);
  iree_runtime_instance_t *instance = NULL;
  CHECK(iree_runtime_instance_create(&instance_options, host, &instance));
  iree_hal_device_t *device = NULL;
  CHECK(iree_runtime_instance_try_create_default_device(instance, iree_make_cstring_view(argv[3]), &device));
  iree_runtime_session_options_t session_options;
  iree_runtime_session_options_initialize(&session_options);
  iree_runtime_session_t *session = NULL;
  CHECK(iree_runtime_session_create_with_device(instance, &session_options, device, host, &session));
  iree_io_file_handle_t *params = NULL;
  CHECK(iree_io_file_handle_preload(IREE_IO_FILE_MODE_READ, iree_make_cstring_view(argv[2]), host, &params));
  iree_io_parameter_index_t *index = NULL;
  CHECK(iree_io_parameter_index_create(host, &index));
  CHECK(iree_io_parse_irpa_index(params, index, host));
  iree_io_parameter_provider_t *provider = NULL;
  CHECK(iree_io_parameter_index_provider_create(iree_make_cstring_view("model"), index,
                                                IREE_IO_PARAMETER_INDEX_PROVIDER_DEFAULT_MAX_CONCURRENT_OPERATIONS,
                                                host, &provider));
  iree_vm_module_t *parameters = NULL;
  CHECK(iree_io_parameters_module_create(iree_runtime_instance_vm_instance(instance), 1, &provider, host, &parameters));
  CHECK(iree_runtime_session_append_module(session, parameters));
  CHECK(iree_runtime_session_append_bytecode_module_from_file(session, argv[1]));
  iree_runtime_call_t call;
  char name[256];
  snprintf(name, sizeof(name), "%s", argv[4]);  // qualified: MODULE_NAME.FUNCTION
  CHECK(iree_runtime_call_initialize_by_name(session, iree_make_cstring_view(name), &call));
  long n = strtol(argv[5], NULL, 10);
  int inputs = argc - 6;
  iree_hal_dim_t shapes[16][8];
  size_t ranks[16], counts[16];
  float *data[16];
  for (int i = 0; i < inputs && i < 16; ++i) {
    ranks[i] = 0, counts[i] = 1;
    for (char *dim = strtok(argv[6 + i], "x"); dim && ranks[i] < 8; dim = strtok(NULL, "x")) {
      shapes[i][ranks[i]] = (iree_hal_dim_t)strtol(dim, NULL, 10);
      counts[i] *= shapes[i][ranks[i]++];
    }
    if (strcmp(argv[6 + i], "scalar") == 0) ranks[i] = 0, counts[i] = 1;
    data[i] = malloc(counts[i] * sizeof(float));
    for (size_t j = 0; j < counts[i]; ++j) data[i][j] = 0.5f;
  }
  float *output = malloc(1 << 24);
  iree_hal_buffer_params_t buffer_params = {.type = IREE_HAL_MEMORY_TYPE_DEVICE_LOCAL,
                                            .usage = IREE_HAL_BUFFER_USAGE_DEFAULT};
  struct timespec start, end;
  for (long r = -10; r < n; ++r) {  // 10 warm-up calls
    if (r == 0) clock_gettime(CLOCK_MONOTONIC, &start);
    iree_runtime_call_reset(&call);
    for (int i = 0; i < inputs; ++i) {
      iree_hal_buffer_view_t *view = NULL;
      CHECK(iree_hal_buffer_view_allocate_buffer_copy(
          device, iree_runtime_session_device_allocator(session), ranks[i], shapes[i], IREE_HAL_ELEMENT_TYPE_FLOAT_32,
          IREE_HAL_ENCODING_TYPE_DENSE_ROW_MAJOR, buffer_params,
          iree_make_const_byte_span(data[i], counts[i] * sizeof(float)), &view));
      CHECK(iree_runtime_call_inputs_push_back_buffer_view(&call, view));
      iree_hal_buffer_view_release(view);
    }
    CHECK(iree_runtime_call_invoke(&call, 0));
    iree_vm_list_t *outputs = iree_runtime_call_outputs(&call);
    for (iree_host_size_t i = 0; i < iree_vm_list_size(outputs); ++i) {
      iree_hal_buffer_view_t *view = iree_vm_list_get_buffer_view_assign(outputs, i);
      iree_device_size_t length = iree_hal_buffer_view_byte_length(view);
      if (length > (1 << 24)) return 3;
      CHECK(iree_hal_device_transfer_d2h(device, iree_hal_buffer_view_buffer(view), 0, output, length,
                                         IREE_HAL_TRANSFER_BUFFER_FLAG_DEFAULT, iree_infinite_timeout()));
    }
  }
  clock_gettime(CLOCK_MONOTONIC, &end);
  double us = ((double)(end.tv_sec - start.tv_sec) * 1e9 + (double)(end.tv_nsec - start.tv_nsec)) / 1e3;
  printf("microseconds_per_call %.3f\n", us / (double)n);
  iree_runtime_call_deinitialize(&call);
  iree_vm_module_release(parameters);
  iree_io_parameter_provider_release(provider);
  iree_io_parameter_index_release(index);
  iree_io_file_handle_release(params);
  iree_runtime_session_release(session);
  iree_hal_device_release(device);
  iree_runtime_instance_release(instance);
  for (int i = 0; i < inputs; ++i) free(data[i]);
  free(output);
  return 0;
}
