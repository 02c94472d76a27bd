// Next-token logits from llama.cpp decoding token ids one at a time (each step a one-token batch,
// as a server's decode step): the independent reference for vvlm's quantized decode, which uses
// the same arithmetic (8-bit activation blocks times the file's Q4_1/Q8_0 blocks).
//
//   cc -O2 benches/llamacpp_decode_logits.c -I$SRC/include -I$SRC/ggml/include \
//      -L$BUILD/bin -lllama -Wl,-rpath,$BUILD/bin -o target/peers/llamacpp_decode_logits
//   target/peers/llamacpp_decode_logits model.gguf 1,2,3 > logits.f32   (steps x vocab, f32 LE)
//
// Built and run by benches/decode_logits_fixture.sh.
#include "llama.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s model.gguf id,id,...\n", argv[0]);
        return 2;
    }
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    struct llama_model *model = llama_model_load_from_file(argv[1], mp);
    if (!model) { fprintf(stderr, "cannot load %s\n", argv[1]); return 1; }
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 512;
    cp.n_batch = 512;
    cp.n_threads = 2;
    cp.n_threads_batch = 2;
    // vvlm's KV cache and attention are f32: make llama.cpp's the same, so the comparison is of
    // the matrix products' arithmetic.
    cp.type_k = GGML_TYPE_F32;
    cp.type_v = GGML_TYPE_F32;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    struct llama_context *ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "cannot create a context\n"); return 1; }
    int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    char *list = strdup(argv[2]);
    for (char *tok = strtok(list, ","); tok; tok = strtok(NULL, ",")) {
        llama_token id = (llama_token)atoi(tok);
        if (llama_decode(ctx, llama_batch_get_one(&id, 1)) != 0) {
            fprintf(stderr, "decode failed\n");
            return 1;
        }
        float *logits = llama_get_logits_ith(ctx, -1);
        fwrite(logits, sizeof(float), n_vocab, stdout);
    }
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
