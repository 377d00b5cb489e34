// SHA-256 (FIPS 180-4), for checking an artifact's files against its manifest. Tested against Python's hashlib.
#ifndef NNX_METAL_SHA256_H_
#define NNX_METAL_SHA256_H_

#include <stddef.h>
#include <stdint.h>

typedef struct nnx_sha256 {
  uint32_t state[8];
  uint64_t length;  // bytes hashed so far
  uint8_t block[64];
  size_t used;  // bytes in block
} nnx_sha256_t;

void nnx_sha256_init(nnx_sha256_t *sha);
void nnx_sha256_update(nnx_sha256_t *sha, const void *data, size_t size);
void nnx_sha256_final(nnx_sha256_t *sha, uint8_t digest[32]);
// The digest of data as 64 lowercase hex characters and a terminating NUL.
void nnx_sha256_hex(const void *data, size_t size, char hex[65]);

#endif  // NNX_METAL_SHA256_H_
