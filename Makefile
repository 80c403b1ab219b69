# Set-up and the two jobs of the README. `make toy` trains, evaluates and runs the demo on the
# embedded toy dataset; `make test` runs the test suite. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TOY_OUT := output/mf_detr_toy

.PHONY: setup toy test test-fast gpu-wheels clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py tools/install_detectron2.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,export,bench]"
	$(PY) tools/install_detectron2.py
	touch $@

toy: setup
	@start=$$(date +%s); \
	$(PY) tools/train_net.py --config-file configs/mf_detr_toy.yaml OUTPUT_DIR $(TOY_OUT) && \
	$(PY) tools/demo.py --config-file configs/mf_detr_toy.yaml --input "datasets/toy_coco/val/0000*.png" \
		--output $(TOY_OUT)/demo --opts MODEL.WEIGHTS $(TOY_OUT)/model_final.pth && \
	end=$$(date +%s) && \
	echo "make toy: training, evaluation and demo took $$(( (end - start) / 60 )) min $$(( (end - start) % 60 )) s on $$(nproc) cores"

# Two pytest-xdist workers of one thread each (tests/conftest.py): the suite's imports, exports and
# evaluations are mostly single-threaded, so two of them use two cores better than one test at a time.
test: setup
	$(PY) -m pytest tests -v -rs --durations=15 -n 2 --dist worksteal

test-fast: setup
	$(PY) -m pytest tests -v -m "not slow" -n 2 --dist worksteal

# The wheels a GPU machine with PyTorch lacks, for tools/gpu_check.py there (into .whl/, ignored by git).
gpu-wheels: setup
	$(PY) tools/gpu_check.py --prepare

clean:
	rm -rf $(VENV) output
