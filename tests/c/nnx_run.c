// nnx_run: drives the nnx-metal C library from the command line, for tests/test_c_runtime.py.
//
//   nnx_run ARTIFACT [--driver D] [--digest HEX] COMMAND...
//     info                         one line per function and state variable
//     call FN IN OUT [REPEAT]      inputs from IN0.bin, IN1.bin...; calls REPEAT times; outputs to OUT0.bin...
//     get NAME FILE                a state variable's bytes into FILE
//     set NAME FILE                a state variable's bytes from FILE
//     save DIR                     the program with its device state as a new artifact
//     time FN IN N                 N calls; prints "microseconds_per_call X"
//     threads FN IN T N            T threads call FN N times each, at once (the program serializes them)
//
// An error prints "nnx_run: <code name>: <message>" on stderr and exits with 10 + the code.
// Uses only nnx_metal.h: it is what an app does.
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <time.h>

#include "nnx_metal.h"

static int failed(const nnx_error_t *error) {
  fprintf(stderr, "nnx_run: %s: %s\n", nnx_code_name(error->code), error->message);
  return 10 + (int)error->code;
}

static int usage(const char *why) {
  fprintf(stderr, "nnx_run: %s\n", why);
  return 2;
}

static void *read_bytes(const char *path, size_t expected) {
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  void *data = malloc(expected ? expected : 1);
  size_t got = data ? fread(data, 1, expected, f) : 0;
  int extra = fgetc(f) != EOF;
  fclose(f);
  if (got != expected || extra) {
    free(data);
    return NULL;
  }
  return data;
}

static int write_bytes(const char *path, const void *data, size_t size) {
  FILE *f = fopen(path, "wb");
  if (!f) return -1;
  size_t put = fwrite(data, 1, size, f);
  return fclose(f) == 0 && put == size ? 0 : -1;
}

static void print_tensor(const nnx_tensor_t *t) {
  printf(" %s:%s[", t->name, nnx_dtype_name(t->dtype));
  for (size_t d = 0; d < t->rank; ++d) printf("%s%lld", d ? "," : "", (long long)t->shape[d]);
  printf("]");
}

typedef struct buffers {
  void **inputs, **outputs;
  size_t input_count, output_count;
} buffers_t;

static void free_buffers(buffers_t *b) {
  for (size_t i = 0; i < b->input_count; ++i) free(b->inputs[i]);
  for (size_t i = 0; i < b->output_count; ++i) free(b->outputs[i]);
  free(b->inputs), free(b->outputs);
}

static int load_inputs(const nnx_function_t *f, const char *prefix, buffers_t *b) {
  b->input_count = f->input_count, b->output_count = f->output_count;
  b->inputs = calloc(f->input_count + 1, sizeof(void *));
  b->outputs = calloc(f->output_count + 1, sizeof(void *));
  char path[4096];
  for (size_t i = 0; i < f->input_count; ++i) {
    snprintf(path, sizeof(path), "%s%zu.bin", prefix, i);
    b->inputs[i] = read_bytes(path, f->inputs[i].byte_length);
    if (!b->inputs[i]) {
      fprintf(stderr, "nnx_run: %s must hold %zu bytes\n", path, f->inputs[i].byte_length);
      return -1;
    }
  }
  for (size_t i = 0; i < f->output_count; ++i) b->outputs[i] = calloc(1, f->outputs[i].byte_length + 1);
  return 0;
}

typedef struct worker {
  nnx_program_t *program;
  const nnx_function_t *function;
  buffers_t *buffers;
  long calls;
  nnx_error_t error;
} worker_t;

static void *work(void *argument) {
  worker_t *w = argument;
  void **outputs = calloc(w->function->output_count + 1, sizeof(void *));
  for (size_t i = 0; i < w->function->output_count; ++i) outputs[i] = malloc(w->function->outputs[i].byte_length + 1);
  w->error.code = NNX_OK;
  for (long c = 0; c < w->calls && w->error.code == NNX_OK; ++c) {
    nnx_program_call(w->program, w->function, (const void *const *)w->buffers->inputs, outputs, &w->error);
  }
  for (size_t i = 0; i < w->function->output_count; ++i) free(outputs[i]);
  free(outputs);
  return NULL;
}

int main(int argc, char **argv) {
  if (argc < 2) return usage("usage: nnx_run ARTIFACT [--driver D] [--digest HEX] COMMAND...");
  nnx_open_options_t options = {NULL, NULL};
  int at = 2;
  for (; at + 1 < argc && strncmp(argv[at], "--", 2) == 0; at += 2) {
    if (strcmp(argv[at], "--driver") == 0) {
      options.driver = argv[at + 1];
    } else if (strcmp(argv[at], "--digest") == 0) {
      options.digest = argv[at + 1];
    } else {
      return usage("unknown option");
    }
  }
  nnx_error_t error;
  nnx_program_t *program = NULL;
  if (nnx_program_open(argv[1], &options, &program, &error)) return failed(&error);
  int status = 0;
  while (at < argc && status == 0) {
    const char *command = argv[at++];
    if (strcmp(command, "info") == 0) {
      printf("target %s driver %s digest %s\n", nnx_program_target(program), nnx_program_driver(program),
             nnx_program_digest(program));
      for (size_t i = 0; i < nnx_program_function_count(program); ++i) {
        const nnx_function_t *f = nnx_program_function(program, i);
        printf("function %s inputs", f->name);
        for (size_t j = 0; j < f->input_count; ++j) print_tensor(&f->inputs[j]);
        printf(" outputs");
        for (size_t j = 0; j < f->output_count; ++j) print_tensor(&f->outputs[j]);
        printf("\n");
      }
      for (size_t i = 0; i < nnx_program_state_count(program); ++i) {
        printf("state");
        print_tensor(nnx_program_state_variable(program, i));
        printf("\n");
      }
    } else if ((strcmp(command, "call") == 0 || strcmp(command, "time") == 0) && at + 2 < argc + 1 && at + 1 < argc) {
      int timing = strcmp(command, "time") == 0;
      const nnx_function_t *f = nnx_program_find_function(program, argv[at]);
      if (!f) return usage("no such function");
      const char *in = argv[at + 1], *out = timing ? NULL : argv[at + 2];
      at += timing ? 2 : 3;
      long repeat = 1;
      if (at < argc && argv[at][0] >= '0' && argv[at][0] <= '9') repeat = strtol(argv[at++], NULL, 10);
      buffers_t b = {0};
      if (load_inputs(f, in, &b)) {
        free_buffers(&b);
        status = 2;
        break;
      }
      struct timespec start, end;
      clock_gettime(CLOCK_MONOTONIC, &start);
      for (long r = 0; r < repeat && status == 0; ++r) {
        if (nnx_program_call(program, f, (const void *const *)b.inputs, b.outputs, &error)) status = failed(&error);
      }
      clock_gettime(CLOCK_MONOTONIC, &end);
      if (timing && status == 0) {
        double us = ((double)(end.tv_sec - start.tv_sec) * 1e9 + (double)(end.tv_nsec - start.tv_nsec)) / 1e3;
        printf("microseconds_per_call %.3f\n", us / (double)repeat);
      }
      char path[4096];
      for (size_t i = 0; !timing && status == 0 && i < f->output_count; ++i) {
        snprintf(path, sizeof(path), "%s%zu.bin", out, i);
        if (write_bytes(path, b.outputs[i], f->outputs[i].byte_length)) status = usage("cannot write an output");
      }
      free_buffers(&b);
    } else if ((strcmp(command, "get") == 0 || strcmp(command, "set") == 0) && at + 1 < argc) {
      const char *name = argv[at], *path = argv[at + 1];
      at += 2;
      const nnx_tensor_t *v = nnx_program_find_state(program, name);
      size_t size = v ? v->byte_length : 0;
      if (command[0] == 'g') {
        void *data = malloc(size + 1);
        if (nnx_program_read_state(program, name, data, size, &error)) {
          status = failed(&error);
        } else if (write_bytes(path, data, size)) {
          status = usage("cannot write the state file");
        }
        free(data);
      } else {
        FILE *f = fopen(path, "rb");
        if (!f) return usage("cannot read the state file");
        fseek(f, 0, SEEK_END);
        long length = ftell(f);
        fseek(f, 0, SEEK_SET);
        void *data = malloc((size_t)length + 1);
        size_t got = fread(data, 1, (size_t)length, f);
        fclose(f);
        if (nnx_program_write_state(program, name, data, got, &error)) status = failed(&error);
        free(data);
      }
    } else if (strcmp(command, "threads") == 0 && at + 3 < argc) {
      const nnx_function_t *f = nnx_program_find_function(program, argv[at]);
      if (!f) return usage("no such function");
      buffers_t b = {0};
      if (load_inputs(f, argv[at + 1], &b)) return 2;
      long threads = strtol(argv[at + 2], NULL, 10), calls = strtol(argv[at + 3], NULL, 10);
      at += 4;
      worker_t *workers = calloc((size_t)threads, sizeof(worker_t));
      pthread_t *ids = calloc((size_t)threads, sizeof(pthread_t));
      for (long t = 0; t < threads; ++t) {
        workers[t] = (worker_t){program, f, &b, calls, {0}};
        pthread_create(&ids[t], NULL, work, &workers[t]);
      }
      for (long t = 0; t < threads; ++t) pthread_join(ids[t], NULL);
      for (long t = 0; t < threads && status == 0; ++t) {
        if (workers[t].error.code) status = failed(&workers[t].error);
      }
      free(workers), free(ids);
      free_buffers(&b);
    } else if (strcmp(command, "save") == 0 && at < argc) {
      if (nnx_program_save(program, argv[at++], &error)) status = failed(&error);
    } else {
      status = usage("unknown command or missing arguments");
    }
  }
  nnx_program_close(program);
  return status;
}
