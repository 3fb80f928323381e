"""What it takes to run vLLM and llama.cpp: their own environments, installs, the glibc patch, and the standalone runner scripts."""
