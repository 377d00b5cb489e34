// fuzz_json: the JSON reader and SHA-256 of the nnx-metal C library under test, built with
// AddressSanitizer and UndefinedBehaviorSanitizer (tests/test_c_runtime.py).
//
//   fuzz_json sha256 FILE...          the sha256 of each file, one per line (compared with hashlib)
//   fuzz_json accepts FILE            for each line of FILE (a document in hex), 1 if it parses, else 0
//   fuzz_json mutate SEED N FILE...   N seeded mutations of the documents (bytes flipped, inserted, deleted,
//                                     copied, truncated, nested): every parse must end cleanly, and a document
//                                     that parses must equal itself and answer every lookup within bounds
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nnx_json.h"
#include "nnx_sha256.h"

static char *slurp(const char *path, size_t *size) {
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  fseek(f, 0, SEEK_END);
  long length = ftell(f);
  fseek(f, 0, SEEK_SET);
  char *data = malloc((size_t)length + 1);
  *size = fread(data, 1, (size_t)length, f);
  fclose(f);
  return data;
}

static uint64_t state;
static uint64_t next(void) {  // xorshift64*
  state ^= state >> 12, state ^= state << 25, state ^= state >> 27;
  return state * 2685821657736338717ull;
}

// Walks every value: keys, strings and integers read back within their bounds.
static void walk(const nnx_json_t *json) {
  for (uint32_t i = 0; i < json->count; ++i) {
    size_t length;
    const char *text = nnx_json_string(json, i, &length);
    if (text && strlen(text) > length) abort();  // no NUL inside a string: strlen == length
    int64_t integer;
    (void)nnx_json_integer(json, i, INT64_MIN, INT64_MAX, &integer);
    if (json->values[i].kind == NNX_JSON_OBJECT) {
      for (uint32_t m = json->values[i].first; m != NNX_JSON_NONE; m = json->values[m].next) {
        if (nnx_json_get(json, i, json->strings + json->values[m].key) != m) abort();  // keys are unique
      }
    }
  }
  if (!nnx_json_equal(json, 0, json, 0)) abort();
}

static void mutate(char *data, size_t *size, size_t capacity) {
  size_t at = *size ? next() % *size : 0;
  switch (next() % 7) {
    case 0:  // flip a byte
      if (*size) data[at] ^= (char)(1u << (next() % 8));
      break;
    case 1:  // a random byte
      if (*size) data[at] = (char)next();
      break;
    case 2:  // delete a run
      if (*size) {
        size_t n = 1 + next() % 8;
        if (n > *size - at) n = *size - at;
        memmove(data + at, data + at + n, *size - at - n);
        *size -= n;
      }
      break;
    case 3:  // insert a JSON-ish token
      {
        static const char *tokens[] = {"{", "}", "[", "]", "\"", ":", ",", "\\u", "\\ud800", "1e999", "-", "null",
                                       "\"a\":1,", "\xff", "\xc0\x80", "0.5", "true"};
        const char *token = tokens[next() % (sizeof(tokens) / sizeof(*tokens))];
        size_t n = strlen(token);
        if (*size + n <= capacity) {
          memmove(data + at + n, data + at, *size - at);
          memcpy(data + at, token, n);
          *size += n;
        }
      }
      break;
    case 4:  // truncate
      *size = at;
      break;
    case 5:  // copy a chunk elsewhere (duplicate keys, repeated members)
      if (*size) {
        size_t from = next() % *size, n = 1 + next() % 64;
        if (n > *size - from) n = *size - from;
        if (*size + n <= capacity) {
          char chunk[64];
          memcpy(chunk, data + from, n);
          memmove(data + at + n, data + at, *size - at);
          memcpy(data + at, chunk, n);
          *size += n;
        }
      }
      break;
    default:  // deep nesting
      {
        size_t n = 1 + next() % 300;
        if (*size + n <= capacity) {
          memmove(data + at + n, data + at, *size - at);
          memset(data + at, next() % 2 ? '[' : '{', n);
          *size += n;
        }
      }
  }
}

static int hex_value(char c) { return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1; }

int main(int argc, char **argv) {
  char message[256];
  if (argc >= 3 && strcmp(argv[1], "sha256") == 0) {
    for (int i = 2; i < argc; ++i) {
      size_t size;
      char *data = slurp(argv[i], &size), hex[65];
      if (!data) return 2;
      nnx_sha256_hex(data, size, hex);
      printf("%s\n", hex);
      free(data);
    }
    return 0;
  }
  if (argc == 3 && strcmp(argv[1], "accepts") == 0) {
    size_t size;
    char *lines = slurp(argv[2], &size);
    if (!lines) return 2;
    char *document = malloc(size / 2 + 1);
    for (char *line = lines; line < lines + size;) {
      char *end = memchr(line, '\n', (size_t)(lines + size - line));
      if (!end) end = lines + size;
      size_t n = 0;
      for (char *c = line; c + 1 < end; c += 2) document[n++] = (char)(hex_value(c[0]) << 4 | hex_value(c[1]));
      nnx_json_t json;
      int ok = nnx_json_parse(document, n, &json, message, sizeof(message)) == 0;
      if (ok) walk(&json), nnx_json_free(&json);
      printf("%d\n", ok);
      line = end + 1;
    }
    free(document), free(lines);
    return 0;
  }
  if (argc >= 5 && strcmp(argv[1], "mutate") == 0) {
    state = strtoull(argv[2], NULL, 10) | 1;
    long iterations = strtol(argv[3], NULL, 10), parsed = 0;
    for (long i = 0; i < iterations; ++i) {
      size_t size;
      char *seed = slurp(argv[4 + next() % (uint64_t)(argc - 4)], &size);
      if (!seed) return 2;
      size_t capacity = size + 4096;
      char *data = malloc(capacity);
      memcpy(data, seed, size);
      free(seed);
      for (uint64_t m = 1 + next() % 8; m > 0; --m) mutate(data, &size, capacity);
      char *exact = malloc(size ? size : 1);  // exactly sized: a read past the end is caught by ASan
      memcpy(exact, data, size);
      nnx_json_t json;
      if (nnx_json_parse(exact, size, &json, message, sizeof(message)) == 0) {
        walk(&json);
        nnx_json_free(&json);
        ++parsed;
      }
      free(exact), free(data);
    }
    printf("mutants %ld parsed %ld\n", iterations, parsed);
    return 0;
  }
  fprintf(stderr, "usage: fuzz_json sha256 FILE... | accepts FILE | mutate SEED N FILE...\n");
  return 2;
}
