# The quick-start commands: `make demo` (the tutorial end to end), `make app` (the web page) and `make test`.
# The first use creates .venv and installs requirements.txt into it.
VENV ?= .venv
PYTHON := $(VENV)/bin/python

.PHONY: demo app test bench evaluate samples robust

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet -r requirements.txt
	touch $@

demo: $(VENV)/.installed
	$(PYTHON) demo.py

# a local page on http://127.0.0.1:7860 (PORT=... for another port, MODEL=... for another classifier)
app: $(VENV)/.installed
	GRADIO_ANALYTICS_ENABLED=False $(PYTHON) app.py --port $(or $(PORT),7860) --model $(or $(MODEL),efficientnet_lite0)

test: $(VENV)/.installed
	$(PYTHON) -m pytest -q

bench: $(VENV)/.installed
	$(PYTHON) bench/attack_speed.py
	$(PYTHON) bench/evaluate_scaling.py

samples: $(VENV)/.installed
	$(PYTHON) utils/sample_images.py --output-dir samples

evaluate: samples
	$(PYTHON) step_8_evaluate.py samples --model efficientnet_lite0 --methods fgsm,pgd,mifgsm,sgd,cw \
		--epsilons 1,2,4,8,16 --steps 1,5,10,20 --output-dir outputs/eval

# The sample photos that have a fitting ImageNet class (assets/sample_labels.csv says why; astronaut, rocket and
# motorcycle have none), evaluated for robust accuracy with the default ensemble.
robust: $(VENV)/.installed
	$(PYTHON) utils/sample_images.py --labelled --output-dir samples_labelled
	$(PYTHON) step_8_evaluate.py samples_labelled --labels assets/sample_labels.csv --model efficientnet_lite0 \
		--epsilons 1,2,4 --steps 100 --output-dir outputs/robust
