// A small, strict JSON reader for manifest.json and the interface a module records (RFC 8259).
//
// Strict: nesting at most NNX_JSON_MAX_DEPTH deep, input at most NNX_JSON_MAX_BYTES, UTF-8 checked,
// no NaN/Infinity, no lone surrogates, no control characters in strings, no duplicate keys in an
// object (Python's json keeps the last; a manifest never has two, so two are refused). Time is
// linear in the input but for sorting each object's keys once (k log k). Values live in one array
// and refer to each other by index, so the reader is two allocations that grow, freed together.
#ifndef NNX_METAL_JSON_H_
#define NNX_METAL_JSON_H_

#include <stddef.h>
#include <stdint.h>

#define NNX_JSON_MAX_DEPTH 128
#define NNX_JSON_MAX_BYTES (64u << 20)
#define NNX_JSON_NONE UINT32_MAX

typedef enum nnx_json_kind {
  NNX_JSON_NULL,
  NNX_JSON_FALSE,
  NNX_JSON_TRUE,
  NNX_JSON_NUMBER,
  NNX_JSON_STRING,
  NNX_JSON_ARRAY,
  NNX_JSON_OBJECT,
} nnx_json_kind_t;

typedef struct nnx_json_value {
  nnx_json_kind_t kind;
  uint32_t key, key_length;  // a member's key: offset and length in strings (NNX_JSON_NONE outside objects)
  uint32_t text, length;     // string: offset/length in strings; number: in the input; array/object: count
  uint32_t first, next;      // first child, next sibling (NNX_JSON_NONE when none)
} nnx_json_value_t;

typedef struct nnx_json {
  nnx_json_value_t *values;  // values[0] is the document
  uint32_t count, capacity;
  char *strings;  // decoded strings and keys, each NUL-terminated
  uint32_t strings_used;
  const char *input;  // numbers are read from it: it must outlive the document
} nnx_json_t;

// Parses input[0:length]. Returns 0, or -1 with a message in error (then nothing is left to free).
int nnx_json_parse(const char *input, size_t length, nnx_json_t *out, char *error, size_t error_size);
void nnx_json_free(nnx_json_t *json);

// The member `key` of the object at `object`, or NNX_JSON_NONE (also when `object` is not an object).
uint32_t nnx_json_get(const nnx_json_t *json, uint32_t object, const char *key);
// The i-th item of an array or member of an object, or NNX_JSON_NONE.
uint32_t nnx_json_item(const nnx_json_t *json, uint32_t container, uint32_t i);
// A string value (NUL-terminated, length in *length when not NULL), or NULL when `value` is no string.
const char *nnx_json_string(const nnx_json_t *json, uint32_t value, size_t *length);
// An integer value in [low, high] (a number with no fraction or exponent): 0, or -1 when it is none.
int nnx_json_integer(const nnx_json_t *json, uint32_t value, int64_t low, int64_t high, int64_t *out);
// Whether two values are equal as JSON: objects compare by key, whatever their order; numbers by their text.
int nnx_json_equal(const nnx_json_t *a, uint32_t x, const nnx_json_t *b, uint32_t y);

#endif  // NNX_METAL_JSON_H_
