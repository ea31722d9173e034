# Included before llama.cpp's own project() (CMAKE_PROJECT_llama.cpp_INCLUDE_BEFORE, set by
# scripts/lib.sh): llama-cpp-python forces llama.cpp's common library on, which only its
# tools, examples and the multimodal library (LLAVA_BUILD, off here) use. The embedded server
# loads libllama and ggml alone; without common (and the HTTP library it brings) the first
# build on a 2-core machine takes well under half the time.
set(LLAMA_BUILD_COMMON OFF CACHE BOOL "llama.cpp: build common utils library" FORCE)
