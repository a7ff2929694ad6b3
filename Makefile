# The quick-start commands: `make demo` (the tutorial end to end), `make app` (the web page) and `make test`.
# The first use creates .venv and installs requirements.txt into it.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
DEMO := outputs/robust-demo

.PHONY: demo app test test-fast bench evaluate samples robust robust-demo certify-demo

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet -r requirements.txt
	touch $@

demo: $(VENV)/.installed
	$(PYTHON) demo.py

# a local page on http://127.0.0.1:7860 (PORT=... for another port, MODEL=... for another classifier)
app: $(VENV)/.installed
	GRADIO_ANALYTICS_ENABLED=False $(PYTHON) app.py --port $(or $(PORT),7860) --model $(or $(MODEL),efficientnet_lite0)

# two test processes (JOBS=... for another count), each taking whole files, so a module's fixtures are built once
test: $(VENV)/.installed
	$(PYTHON) -m pytest -q -n $(or $(JOBS),2) --dist loadfile

# the fast lane (two test processes, as make test): every module exercised in process and one run per program in a
# fresh process (smoke), without the other fresh-process runs (e2e), the slow ones, the peers' cross-checks and the
# browser
test-fast: $(VENV)/.installed
	$(PYTHON) -m pytest -q -n $(or $(JOBS),2) --dist loadfile \
		-m "not slow and not crosscheck and not browser and (not e2e or smoke)"

bench: $(VENV)/.installed $(DEMO)/adversarial.pt2 outputs/certify-demo/mlp.pt2
	$(PYTHON) bench/attack_speed.py
	$(PYTHON) bench/evaluate_scaling.py
	$(PYTHON) bench/robust_accuracy.py --model $(DEMO)/adversarial.pt2 --folder digits/test --norm Linf,L2,L1
	$(PYTHON) bench/robust_accuracy.py --model $(DEMO)/adversarial.pt2 --folder digits/test --norm Linf,L2,L1 \
		--processes 2 --batch-size 50
	$(PYTHON) bench/fast_ensemble.py --model $(DEMO)/adversarial.pt2 > outputs/fast_ensemble_pgd.md
	$(PYTHON) bench/fast_ensemble.py --model outputs/certify-demo/mlp.pt2 --epsilons 16,1,8 > outputs/fast_ensemble_mlp.md

$(DEMO)/adversarial.pt2:
	$(MAKE) robust-demo

samples: $(VENV)/.installed
	$(PYTHON) -m tools.sample_images --output-dir samples

evaluate: samples
	$(PYTHON) step_8_evaluate.py samples --model efficientnet_lite0 --methods fgsm,pgd,mifgsm,sgd,cw \
		--epsilons 1,2,4,8,16 --steps 1,5,10,20 --output-dir outputs/eval

# The sample photos that have a fitting ImageNet class (assets/sample_labels.csv says why; astronaut, rocket and
# motorcycle have none), evaluated for robust accuracy with the default ensemble.
robust: $(VENV)/.installed
	$(PYTHON) -m tools.sample_images --labelled --output-dir samples_labelled
	$(PYTHON) step_8_evaluate.py samples_labelled --labels assets/sample_labels.csv --model efficientnet_lite0 \
		--epsilons 1,2,4 --steps 100 --output-dir outputs/robust

# Step 9 on scikit-learn's handwritten digits (offline): a standard and an adversarially trained small CNN on the train
# split, then step 8's ensemble on 100 test digits (10 per class) for both at three epsilons, and one table and figure;
# then a third model trained with PGD-L2, and the three evaluated at one L2 budget (a second table, in $(DEMO)/l2).
DEMO_EVAL := --epsilons 8,16,32 --steps 50 --queries 1000 --batch-size 100
# the same digits at one L2 budget (the norm of the whole 3x32x32 perturbation in [0, 1] units): the standard model,
# the L-infinity-trained one and one trained with PGD-L2 at that budget
DEMO_EVAL_L2 := --norm L2 --epsilons 2 --steps 50 --batch-size 100
robust-demo: $(VENV)/.installed
	$(PYTHON) -m tools.sample_images --digits digits --test-per-class 10
	$(PYTHON) step_9_adversarial_training.py digits/train --method none --epochs 10 --output $(DEMO)/standard.pt2
	$(PYTHON) step_9_adversarial_training.py digits/train --method pgd --epsilon 32 --steps 3 --epochs 10 \
		--output $(DEMO)/adversarial.pt2
	$(PYTHON) step_8_evaluate.py digits/test --model $(DEMO)/standard.pt2 $(DEMO_EVAL) --output-dir $(DEMO)/eval-standard
	$(PYTHON) step_8_evaluate.py digits/test --model $(DEMO)/adversarial.pt2 $(DEMO_EVAL) --output-dir $(DEMO)/eval-adversarial
	$(PYTHON) -m tools.compare_models $(DEMO)/eval-standard $(DEMO)/eval-adversarial \
		--names "standard training,adversarial training (PGD-3 at epsilon 32)" --output-dir $(DEMO)
	$(PYTHON) step_9_adversarial_training.py digits/train --method pgd --norm L2 --epsilon 2 --steps 3 --epochs 10 \
		--output $(DEMO)/adversarial_l2.pt2
	$(PYTHON) step_8_evaluate.py digits/test --model $(DEMO)/standard.pt2 $(DEMO_EVAL_L2) --output-dir $(DEMO)/eval-standard-l2
	$(PYTHON) step_8_evaluate.py digits/test --model $(DEMO)/adversarial.pt2 $(DEMO_EVAL_L2) --output-dir $(DEMO)/eval-adversarial-l2
	$(PYTHON) step_8_evaluate.py digits/test --model $(DEMO)/adversarial_l2.pt2 $(DEMO_EVAL_L2) \
		--output-dir $(DEMO)/eval-adversarial_l2-l2
	$(PYTHON) -m tools.compare_models $(DEMO)/eval-standard-l2 $(DEMO)/eval-adversarial-l2 $(DEMO)/eval-adversarial_l2-l2 \
		--names "standard training,PGD-3 at L-infinity 32,PGD-3 at L2 2" --output-dir $(DEMO)/l2

# Step 10 on the digits (offline): an adversarially trained MLP (small enough for the exact verifier), then on the same
# 100 test digits at two epsilons: step 8's ensemble (the attacks' upper bound), the reference AutoAttack, step 10's
# exact verifier (the truth, up to its time limit) and its bounds alone (the fast lower bound), step 8 --certify
# setting them side by side. Then randomized smoothing: a digits CNN trained under Gaussian noise and the PGD-trained
# one of robust-demo, certified accuracy against the L2 radius for both, and the radius around Grace Hopper. Then the
# convolutional networks (docs/certification.md): bench/certify.py's methods on robust-demo's PGD-trained small CNN
# and on one trained with CROWN-IBP, at 2 and 8 levels on the 100 test digits.
CERTIFY := outputs/certify-demo
CERTIFY_EPSILONS := 8,16
$(CERTIFY)/mlp.pt2: $(VENV)/.installed
	$(PYTHON) -m tools.sample_images --digits digits --test-per-class 10
	$(PYTHON) step_9_adversarial_training.py digits/train --arch mlp --method pgd --epsilon 16 --steps 5 --epochs 10 \
		--threads 1 --output $@

certify-demo: $(VENV)/.installed $(DEMO)/adversarial.pt2 samples $(CERTIFY)/mlp.pt2
	$(PYTHON) step_8_evaluate.py digits/test --model $(CERTIFY)/mlp.pt2 --epsilons $(CERTIFY_EPSILONS) \
		--steps 50 --queries 1000 --batch-size 100 --certify exact,bounds --time-limit 20 --threads 1 --output-dir $(CERTIFY)/eval
	$(PYTHON) bench/robust_accuracy.py --model $(CERTIFY)/mlp.pt2 --folder digits/test --norm Linf \
		--epsilons 8,16 > $(CERTIFY)/reference.md
	$(PYTHON) step_10_certify.py digits/test --model $(CERTIFY)/mlp.pt2 --method bounds --epsilons $(CERTIFY_EPSILONS) \
		--output-dir $(CERTIFY)/bounds
	$(PYTHON) step_9_adversarial_training.py digits/train --method noise --sigma 0.25 --epochs 10 \
		--output $(CERTIFY)/noise.pt2
	$(PYTHON) bench/smoothing_demo.py --folder digits/test --models $(CERTIFY)/noise.pt2,$(DEMO)/adversarial.pt2 \
		--names "Gaussian noise training (sigma 0.25),PGD-3 training (L-infinity 32)" --sigma 0.25 \
		--output-dir $(CERTIFY)/smoothing
	$(PYTHON) step_10_certify.py samples/grace_hopper.jpg --model efficientnet_lite0 --method smoothing --sigma 0.12 \
		--n 1000 --batch-size 100 --output-dir $(CERTIFY)/grace_hopper
	$(PYTHON) bench/certify.py --model $(DEMO)/adversarial.pt2 --images 100 --epsilon 2 --time-limit 60 \
		> $(CERTIFY)/bench-pgd-2.md
	$(PYTHON) bench/certify.py --model $(DEMO)/adversarial.pt2 --images 100 --epsilon 8 --time-limit 10 \
		> $(CERTIFY)/bench-pgd-8.md
	$(PYTHON) step_9_adversarial_training.py digits/train --method crown-ibp --epsilon 8 --epochs 10 --threads 1 \
		--output $(CERTIFY)/crown_ibp.pt2
	$(PYTHON) bench/certify.py --model $(CERTIFY)/crown_ibp.pt2 --images 100 --epsilon 2 --time-limit 60 \
		> $(CERTIFY)/bench-crown-ibp-2.md
	$(PYTHON) bench/certify.py --model $(CERTIFY)/crown_ibp.pt2 --images 100 --epsilon 8 --time-limit 10 \
		> $(CERTIFY)/bench-crown-ibp-8.md
	$(PYTHON) bench/fast_ensemble.py --model $(CERTIFY)/crown_ibp.pt2 --epsilons 8,1,8 > outputs/fast_ensemble_crown_ibp.md
