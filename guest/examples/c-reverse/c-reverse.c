/* A mu2 function in C: the response is the request, reversed. */
#include <mu2.h>

int mu2_function(const uint8_t *request, size_t len, mu2_response *response)
{
    uint8_t *out = mu2_response_alloc(response, len);
    if (out == NULL && len != 0)
        return 1;
    for (size_t i = 0; i < len; i++)
        out[i] = request[len - 1 - i];
    return 0;
}
