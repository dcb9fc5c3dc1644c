"""Run under knl-train launch with an ITEX preset: train a few steps, then write each thread's CPUs."""

import json
import os
import sys

import tensorflow as tf

model = tf.keras.Sequential([tf.keras.layers.Conv2D(16, 3, input_shape=(32, 32, 8)),
                             tf.keras.layers.Flatten(), tf.keras.layers.Dense(4)])
model.compile("sgd", "sparse_categorical_crossentropy")
model.fit(tf.random.uniform((16, 32, 32, 8)), tf.zeros((16,), tf.int32), epochs=1, verbose=0)
threads = []
for tid in os.listdir("/proc/self/task"):
    threads.append(sorted(os.sched_getaffinity(int(tid))))
libs = sorted({line.split()[-1].rsplit("/", 1)[-1] for line in open("/proc/self/maps")
               if "libiomp5" in line})
with open(os.path.join(sys.argv[1], "omp.json"), "w") as f:
    json.dump({"threads": threads, "libs": libs, "env": dict(os.environ)}, f)
