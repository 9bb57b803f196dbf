/*
 * mu2.h: a mu2 function in C, linked with the mu2 guest SDK built as a static library
 * (libmu2_guest.a, the SDK with its `c` feature; see guest/sdk/README.md for the build).
 *
 * The program defines mu2_function and nothing else: the SDK provides the entry, the heap, the
 * virtio-vsock driver and the serve loop, and calls mu2_function once per request (each in a
 * fresh VM). There is no libc; memcpy, memmove, memset and memcmp are the SDK's.
 */
#ifndef MU2_H
#define MU2_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The response being built. It belongs to the SDK, which sends it when mu2_function returns 0
 * and then frees it (also when it returns anything else); the function only writes to it
 * through the mu2_response_* calls. */
typedef struct mu2_response mu2_response;

/*
 * Defined by the program: answers one request. `request` holds `len` bytes, readable until the
 * function returns (do not keep the pointer). Return 0 to send the response; anything else is a
 * function error, "mu2_function returned <value>", that the caller gets instead (mu2 invoke
 * exits with code 8, the daemon answers 500).
 */
int mu2_function(const uint8_t *request, size_t len, mu2_response *response);

/* Appends `len` bytes at `data` to the response. 0, or -1 if the heap is exhausted. */
int mu2_response_write(mu2_response *response, const void *data, size_t len);

/* Makes the response `len` zero bytes long and returns them to fill in place (valid until the
 * function returns or calls mu2_response_* again); NULL if the heap is exhausted. */
uint8_t *mu2_response_alloc(mu2_response *response, size_t len);

/* Memory for the function's own use, 16-byte aligned; NULL if the heap is exhausted. Freed
 * with mu2_free, or with the VM at the end of the request. */
void *mu2_malloc(size_t len);
void mu2_free(void *block);

/* Writes to the serial console: one VM exit per byte, for debugging only. */
void mu2_log(const char *text, size_t len);

/* 64 random bits; the generator is reseeded from the host in every VM forked from an image. */
uint64_t mu2_random_u64(void);

/* Wall-clock time in nanoseconds since the Unix epoch. */
uint64_t mu2_now_unix_ns(void);

#ifdef __cplusplus
}
#endif

#endif /* MU2_H */
