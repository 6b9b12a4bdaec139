"""The tiny random-weight Qwen-Image-Edit kit shared by the tests, the benchmarks and `cli.py selftest`."""
