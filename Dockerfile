# SEDAC on a CUDA host. Installs through the same steps as the Makefile (`make install`), so the
# image and a developer checkout run the same code; torch==2.13.0 from PyPI is the CUDA build on Linux.
FROM nvidia/cuda:13.0.0-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev make gcc g++ \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/sedac
COPY pyproject.toml setup.py Makefile README.md ./
COPY sedac ./sedac
COPY configs ./configs
# A portable build of the C++ kernels (AVX2 baseline, setup.py), so the image runs on any x86-64 host.
ENV SEDAC_CPU_ARCH=portable
RUN make install
ENV PATH=/opt/sedac/.venv/bin:$PATH

# Build the default engine into the image; mount your own engines at /opt/sedac/engines instead if you like.
RUN sedac-build --model smollm2-135m-instruct --config configs/fp16-serving.yaml --output engines/smollm2-fp16
CMD ["sedac-run", "generate", "--engine", "engines/smollm2-fp16", "--prompt", "Hello!"]
