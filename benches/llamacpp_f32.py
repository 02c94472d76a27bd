"""The F32 requantization of a GGUF file by llama.cpp's own quantize tool (llama-cpp-python),
made once beside the file: the same dequantized weights vvlm's f32 path uses."""
import ctypes, os
import llama_cpp


def f32_gguf(gguf: str) -> str:
    f32 = os.path.splitext(gguf)[0] + ".F32.gguf"
    if not os.path.exists(f32):
        p = llama_cpp.llama_model_quantize_default_params()
        p.ftype = llama_cpp.LLAMA_FTYPE_ALL_F32
        p.allow_requantize = True
        assert llama_cpp.llama_model_quantize(gguf.encode(), f32.encode(), ctypes.byref(p)) == 0
    return f32
