// See nnx_json.h. A recursive-descent reader over a bounded depth; every read checks the end of input first.
#include "nnx_json.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct parser {
  const unsigned char *at, *end, *start;
  nnx_json_t *json;
  char *error;
  size_t error_size;
} parser_t;

static int fail(parser_t *p, const char *format, ...) {
  if (p->error && p->error_size) {
    int written = snprintf(p->error, p->error_size, "at byte %zu: ", (size_t)(p->at - p->start));
    va_list args;
    va_start(args, format);
    if (written >= 0 && (size_t)written < p->error_size) {
      vsnprintf(p->error + written, p->error_size - (size_t)written, format, args);
    }
    va_end(args);
  }
  return -1;
}

static void skip_space(parser_t *p) {
  while (p->at < p->end && (*p->at == ' ' || *p->at == '\t' || *p->at == '\n' || *p->at == '\r')) ++p->at;
}

static uint32_t new_value(parser_t *p, nnx_json_kind_t kind) {
  nnx_json_t *json = p->json;
  if (json->count == json->capacity) {
    uint32_t capacity = json->capacity ? json->capacity * 2 : 64;
    nnx_json_value_t *values = realloc(json->values, (size_t)capacity * sizeof(*values));
    if (!values) return NNX_JSON_NONE;
    json->values = values, json->capacity = capacity;
  }
  nnx_json_value_t *value = &json->values[json->count];
  memset(value, 0, sizeof(*value));
  value->kind = kind;
  value->key = value->first = value->next = NNX_JSON_NONE;
  return json->count++;
}

static int literal(parser_t *p, const char *word) {
  size_t n = strlen(word);
  if ((size_t)(p->end - p->at) < n || memcmp(p->at, word, n) != 0) return fail(p, "expected a JSON value");
  p->at += n;
  return 0;
}

static void put_utf8(char *out, uint32_t *used, uint32_t code) {
  unsigned char *o = (unsigned char *)out + *used;
  if (code < 0x80) {
    o[0] = (unsigned char)code, *used += 1;
  } else if (code < 0x800) {
    o[0] = (unsigned char)(0xC0 | code >> 6), o[1] = (unsigned char)(0x80 | (code & 0x3F)), *used += 2;
  } else if (code < 0x10000) {
    o[0] = (unsigned char)(0xE0 | code >> 12), o[1] = (unsigned char)(0x80 | (code >> 6 & 0x3F));
    o[2] = (unsigned char)(0x80 | (code & 0x3F)), *used += 3;
  } else {
    o[0] = (unsigned char)(0xF0 | code >> 18), o[1] = (unsigned char)(0x80 | (code >> 12 & 0x3F));
    o[2] = (unsigned char)(0x80 | (code >> 6 & 0x3F)), o[3] = (unsigned char)(0x80 | (code & 0x3F)), *used += 4;
  }
}

static int hex4(parser_t *p, uint32_t *out) {
  if (p->end - p->at < 4) return fail(p, "truncated \\u escape");
  uint32_t code = 0;
  for (int i = 0; i < 4; ++i) {
    unsigned char c = p->at[i];
    uint32_t digit = c >= '0' && c <= '9' ? (uint32_t)(c - '0')
                     : c >= 'a' && c <= 'f' ? (uint32_t)(c - 'a' + 10)
                     : c >= 'A' && c <= 'F' ? (uint32_t)(c - 'A' + 10)
                                            : 16u;
    if (digit == 16) return fail(p, "bad \\u escape");
    code = code << 4 | digit;
  }
  p->at += 4;
  *out = code;
  return 0;
}

// Length of one well-formed UTF-8 sequence at s (at most n bytes), or 0 (overlong, surrogate, > U+10FFFF).
static size_t utf8_sequence(const unsigned char *s, size_t n) {
  if (s[0] < 0x80) return 1;
  size_t length = s[0] >= 0xC2 && s[0] <= 0xDF ? 2 : s[0] >= 0xE0 && s[0] <= 0xEF ? 3 : s[0] >= 0xF0 && s[0] <= 0xF4 ? 4 : 0;
  if (length == 0 || length > n) return 0;
  for (size_t i = 1; i < length; ++i) {
    if ((s[i] & 0xC0) != 0x80) return 0;
  }
  if (s[0] == 0xE0 && s[1] < 0xA0) return 0;   // overlong
  if (s[0] == 0xED && s[1] >= 0xA0) return 0;  // a surrogate
  if (s[0] == 0xF0 && s[1] < 0x90) return 0;   // overlong
  if (s[0] == 0xF4 && s[1] >= 0x90) return 0;  // above U+10FFFF
  return length;
}

// Reads a string (p->at on the opening quote) into json->strings; its offset and length go to *offset, *length.
static int string(parser_t *p, uint32_t *offset, uint32_t *length) {
  nnx_json_t *json = p->json;
  ++p->at;
  *offset = json->strings_used;
  for (;;) {
    if (p->at >= p->end) return fail(p, "unterminated string");
    unsigned char c = *p->at;
    if (c == '"') break;
    if (c < 0x20) return fail(p, "control character in a string");
    if (c != '\\') {
      size_t n = utf8_sequence(p->at, (size_t)(p->end - p->at));
      if (n == 0) return fail(p, "invalid UTF-8");
      memcpy(json->strings + json->strings_used, p->at, n);
      json->strings_used += (uint32_t)n, p->at += n;
      continue;
    }
    if (p->end - p->at < 2) return fail(p, "truncated escape");
    char escape = (char)p->at[1];
    p->at += 2;
    const char *simple = strchr("\"\\/bfnrt", escape);
    if (escape != '\0' && simple) {
      static const char decoded[] = "\"\\/\b\f\n\r\t";
      json->strings[json->strings_used++] = decoded[simple - "\"\\/bfnrt"];
      continue;
    }
    if (escape != 'u') return fail(p, "bad escape \\%c", escape);
    uint32_t code = 0;
    if (hex4(p, &code)) return -1;
    if (code >= 0xDC00 && code <= 0xDFFF) return fail(p, "lone low surrogate");
    if (code >= 0xD800 && code <= 0xDBFF) {
      uint32_t low = 0;
      if (p->end - p->at < 2 || p->at[0] != '\\' || p->at[1] != 'u') return fail(p, "lone high surrogate");
      p->at += 2;
      if (hex4(p, &low)) return -1;
      if (low < 0xDC00 || low > 0xDFFF) return fail(p, "lone high surrogate");
      code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
    }
    if (code == 0) return fail(p, "NUL in a string");
    // An escape is at least 6 input bytes for at most 4 output bytes (12 for 4): decoded never outgrows the input.
    put_utf8(json->strings, &json->strings_used, code);
  }
  ++p->at;
  *length = json->strings_used - *offset;
  json->strings[json->strings_used++] = '\0';
  return 0;
}

static int digits(parser_t *p) {
  const unsigned char *begin = p->at;
  while (p->at < p->end && *p->at >= '0' && *p->at <= '9') ++p->at;
  return p->at > begin ? 0 : fail(p, "expected a digit");
}

static int number(parser_t *p, uint32_t value) {
  const unsigned char *begin = p->at;
  if (p->at < p->end && *p->at == '-') ++p->at;
  if (p->at < p->end && *p->at == '0') {
    ++p->at;
  } else if (digits(p)) {
    return -1;
  }
  if (p->at < p->end && *p->at == '.') {
    ++p->at;
    if (digits(p)) return -1;
  }
  if (p->at < p->end && (*p->at == 'e' || *p->at == 'E')) {
    ++p->at;
    if (p->at < p->end && (*p->at == '+' || *p->at == '-')) ++p->at;
    if (digits(p)) return -1;
  }
  p->json->values[value].text = (uint32_t)(begin - p->start);
  p->json->values[value].length = (uint32_t)(p->at - begin);
  return 0;
}

// qsort has no context argument in C11: the strings of the object being checked, per thread.
static _Thread_local const char *thread_strings;

static int key_order(const void *a, const void *b) {
  const nnx_json_value_t *x = *(nnx_json_value_t *const *)a, *y = *(nnx_json_value_t *const *)b;
  if (x->key_length != y->key_length) return x->key_length < y->key_length ? -1 : 1;
  return memcmp(thread_strings + x->key, thread_strings + y->key, x->key_length);
}

// Refuses an object with a key twice: sorts its members' keys, then compares neighbours.
static int unique_keys(parser_t *p, uint32_t object) {
  nnx_json_t *json = p->json;
  uint32_t count = json->values[object].length;
  if (count < 2) return 0;
  const nnx_json_value_t **members = malloc((size_t)count * sizeof(*members));
  if (!members) return fail(p, "out of memory");
  uint32_t i = 0;
  for (uint32_t m = json->values[object].first; m != NNX_JSON_NONE; m = json->values[m].next) members[i++] = &json->values[m];
  thread_strings = json->strings;
  qsort(members, count, sizeof(*members), key_order);
  int result = 0;
  for (i = 1; i < count && result == 0; ++i) {
    if (key_order(&members[i - 1], &members[i]) == 0) {
      result = fail(p, "key \"%.80s\" appears twice in one object", json->strings + members[i]->key);
    }
  }
  free(members);
  return result;
}

static int value(parser_t *p, uint32_t *out, int depth);

static int container(parser_t *p, uint32_t self, int depth, int is_object) {
  nnx_json_t *json = p->json;
  char close = is_object ? '}' : ']';
  ++p->at;
  skip_space(p);
  if (p->at < p->end && *p->at == close) {
    ++p->at;
    return 0;
  }
  uint32_t last = NNX_JSON_NONE;
  for (;;) {
    uint32_t key = NNX_JSON_NONE, key_length = 0, child;
    skip_space(p);
    if (is_object) {
      if (p->at >= p->end || *p->at != '"') return fail(p, "expected a string key");
      if (string(p, &key, &key_length)) return -1;
      skip_space(p);
      if (p->at >= p->end || *p->at != ':') return fail(p, "expected ':'");
      ++p->at;
    }
    if (value(p, &child, depth + 1)) return -1;
    json->values[child].key = key, json->values[child].key_length = key_length;
    if (last == NNX_JSON_NONE) {
      json->values[self].first = child;
    } else {
      json->values[last].next = child;
    }
    last = child;
    if (json->values[self].length == UINT32_MAX - 1) return fail(p, "too many items");
    json->values[self].length++;
    skip_space(p);
    if (p->at < p->end && *p->at == ',') {
      ++p->at;
      continue;
    }
    if (p->at < p->end && *p->at == close) {
      ++p->at;
      return is_object ? unique_keys(p, self) : 0;
    }
    return fail(p, "expected ',' or '%c'", close);
  }
}

static int value(parser_t *p, uint32_t *out, int depth) {
  if (depth > NNX_JSON_MAX_DEPTH) return fail(p, "nested more than %d deep", NNX_JSON_MAX_DEPTH);
  skip_space(p);
  if (p->at >= p->end) return fail(p, "unexpected end of input");
  unsigned char c = *p->at;
  nnx_json_kind_t kind = c == '{'   ? NNX_JSON_OBJECT
                         : c == '[' ? NNX_JSON_ARRAY
                         : c == '"' ? NNX_JSON_STRING
                         : c == 't' ? NNX_JSON_TRUE
                         : c == 'f' ? NNX_JSON_FALSE
                         : c == 'n' ? NNX_JSON_NULL
                                    : NNX_JSON_NUMBER;
  uint32_t self = new_value(p, kind);
  if (self == NNX_JSON_NONE) return fail(p, "out of memory");
  *out = self;
  switch (kind) {
    case NNX_JSON_OBJECT:
      return container(p, self, depth, 1);
    case NNX_JSON_ARRAY:
      return container(p, self, depth, 0);
    case NNX_JSON_STRING: {
      uint32_t offset, length;
      if (string(p, &offset, &length)) return -1;
      p->json->values[self].text = offset, p->json->values[self].length = length;
      return 0;
    }
    case NNX_JSON_TRUE:
      return literal(p, "true");
    case NNX_JSON_FALSE:
      return literal(p, "false");
    case NNX_JSON_NULL:
      return literal(p, "null");
    default:
      if (c != '-' && (c < '0' || c > '9')) return fail(p, "expected a JSON value");
      return number(p, self);
  }
}

int nnx_json_parse(const char *input, size_t length, nnx_json_t *out, char *error, size_t error_size) {
  memset(out, 0, sizeof(*out));
  parser_t p = {(const unsigned char *)input, (const unsigned char *)input + length, (const unsigned char *)input,
                out, error, error_size};
  if (length > NNX_JSON_MAX_BYTES) return fail(&p, "the document is larger than %u bytes", NNX_JSON_MAX_BYTES);
  out->input = input;
  out->strings = malloc(length + 1);  // decoded strings never take more room than their source
  uint32_t root;
  if (!out->strings) {
    fail(&p, "out of memory");
  } else if (value(&p, &root, 0) == 0) {
    skip_space(&p);
    if (p.at == p.end) return 0;
    fail(&p, "unexpected text after the document");
  }
  nnx_json_free(out);
  return -1;
}

void nnx_json_free(nnx_json_t *json) {
  free(json->values);
  free(json->strings);
  memset(json, 0, sizeof(*json));
}

uint32_t nnx_json_item(const nnx_json_t *json, uint32_t container, uint32_t i) {
  if (container >= json->count) return NNX_JSON_NONE;
  const nnx_json_value_t *c = &json->values[container];
  if (c->kind != NNX_JSON_ARRAY && c->kind != NNX_JSON_OBJECT) return NNX_JSON_NONE;
  uint32_t item = c->first;
  for (; item != NNX_JSON_NONE && i > 0; --i) item = json->values[item].next;
  return item;
}

uint32_t nnx_json_get(const nnx_json_t *json, uint32_t object, const char *key) {
  if (object >= json->count || json->values[object].kind != NNX_JSON_OBJECT) return NNX_JSON_NONE;
  size_t length = strlen(key);
  for (uint32_t m = json->values[object].first; m != NNX_JSON_NONE; m = json->values[m].next) {
    const nnx_json_value_t *v = &json->values[m];
    if (v->key_length == length && memcmp(json->strings + v->key, key, length) == 0) return m;
  }
  return NNX_JSON_NONE;
}

const char *nnx_json_string(const nnx_json_t *json, uint32_t value, size_t *length) {
  if (value >= json->count || json->values[value].kind != NNX_JSON_STRING) return NULL;
  if (length) *length = json->values[value].length;
  return json->strings + json->values[value].text;
}

int nnx_json_integer(const nnx_json_t *json, uint32_t value, int64_t low, int64_t high, int64_t *out) {
  if (value >= json->count || json->values[value].kind != NNX_JSON_NUMBER) return -1;
  const char *text = json->input + json->values[value].text;
  uint32_t length = json->values[value].length, i = 0;
  int negative = text[0] == '-';
  i += (uint32_t)negative;
  if (i == length) return -1;
  uint64_t magnitude = 0;
  for (; i < length; ++i) {
    if (text[i] < '0' || text[i] > '9') return -1;  // a fraction or an exponent: not an integer here
    if (magnitude > (UINT64_MAX - 9) / 10) return -1;
    magnitude = magnitude * 10 + (uint64_t)(text[i] - '0');
  }
  if (magnitude > (uint64_t)INT64_MAX) return -1;
  int64_t result = negative ? -(int64_t)magnitude : (int64_t)magnitude;
  if (result < low || result > high) return -1;
  *out = result;
  return 0;
}

int nnx_json_equal(const nnx_json_t *a, uint32_t x, const nnx_json_t *b, uint32_t y) {
  if (x >= a->count || y >= b->count) return 0;
  const nnx_json_value_t *u = &a->values[x], *v = &b->values[y];
  if (u->kind != v->kind) return 0;
  switch (u->kind) {
    case NNX_JSON_NUMBER:
      return u->length == v->length && memcmp(a->input + u->text, b->input + v->text, u->length) == 0;
    case NNX_JSON_STRING:
      return u->length == v->length && memcmp(a->strings + u->text, b->strings + v->text, u->length) == 0;
    case NNX_JSON_ARRAY: {
      if (u->length != v->length) return 0;
      for (uint32_t i = u->first, j = v->first; i != NNX_JSON_NONE; i = a->values[i].next, j = b->values[j].next) {
        if (!nnx_json_equal(a, i, b, j)) return 0;
      }
      return 1;
    }
    case NNX_JSON_OBJECT: {
      if (u->length != v->length) return 0;  // keys are unique, so same count + each found = same key set
      for (uint32_t i = u->first; i != NNX_JSON_NONE; i = a->values[i].next) {
        uint32_t j = nnx_json_get(b, y, a->strings + a->values[i].key);
        if (j == NNX_JSON_NONE || !nnx_json_equal(a, i, b, j)) return 0;
      }
      return 1;
    }
    default:
      return 1;
  }
}
