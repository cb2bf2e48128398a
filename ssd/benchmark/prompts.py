"""The embedded default prompt set: code, math word problems, instructions and chat.

Written for this project; used when no dataset is selected, so a benchmark runs with no
files and no network.
"""

CODE_PROMPTS: tuple[str, ...] = (  # write or complete Python
    "Write a Python function `is_palindrome(s: str) -> bool` that ignores case and "
    "non-alphanumeric characters. Include a docstring and three doctest examples.",
    "Complete this function so that it returns the n-th Fibonacci number in O(n) time:\n\n"
    "def fib(n: int) -> int:\n    \"\"\"Return the n-th Fibonacci number, fib(0) == 0.\"\"\"\n",
    "Write a Python function that merges two sorted lists into one sorted list without "
    "calling sort() or sorted().",
    "Implement a least-recently-used cache class in Python with `get(key)` and "
    "`put(key, value)`, both O(1), and a fixed capacity given to the constructor.",
    "Write a Python generator `chunks(iterable, size)` that yields lists of at most `size` "
    "items, and explain what happens with the last, shorter chunk.",
    "Complete the function:\n\ndef count_words(text: str) -> dict[str, int]:\n"
    "    \"\"\"Count how often each lower-cased word occurs, ignoring punctuation.\"\"\"\n",
    "Write a Python function that parses a string like '3h25m10s' into a number of seconds, "
    "raising ValueError on malformed input.",
    "Here is a buggy binary search. Find the bug and give a corrected version:\n\n"
    "def search(xs, target):\n    lo, hi = 0, len(xs)\n    while lo < hi:\n"
    "        mid = (lo + hi) // 2\n        if xs[mid] < target:\n            lo = mid\n"
    "        else:\n            hi = mid\n    return lo\n",
    "Write a function `flatten(nested)` that flattens arbitrarily nested lists of integers, "
    "first recursively and then iteratively with an explicit stack.",
    "Write a small command-line Python script that reads a CSV file given as an argument and "
    "prints the mean of every numeric column.",
)

MATH_PROMPTS: tuple[str, ...] = (
    "A baker makes 48 muffins. She sells three quarters of them in the morning and half of the "
    "rest in the afternoon. How many muffins are left? Explain step by step.",
    "A train leaves at 9:40 and travels 210 km at an average speed of 84 km/h. At what time "
    "does it arrive?",
    "Tom is three times as old as his daughter. In twelve years he will be twice as old as she "
    "will be. How old are they now?",
    "A rectangle has a perimeter of 56 cm and its length is 4 cm more than its width. "
    "What is its area?",
    "A shop discounts a jacket by 20%, then takes a further 15% off the sale price. The final "
    "price is $68. What was the original price?",
    "Three pipes fill a tank in 6, 8 and 12 hours respectively. How long do they take together?",
    "Maria saves $15 in the first week and each week saves $5 more than the week before. "
    "How much has she saved after ten weeks?",
    "A class of 30 students has 12 who play chess, 17 who play football and 6 who play both. "
    "How many play neither? Show your reasoning.",
)

INSTRUCTION_PROMPTS: tuple[str, ...] = (
    "Summarize the causes of the French Revolution in five bullet points.",
    "Explain the difference between a process and a thread to a new programmer, with an "
    "everyday analogy.",
    "Write a short, polite email asking a colleague to review a pull request by Friday.",
    "List the steps to make a cup of pour-over coffee, with the water temperature and timing.",
    "Rewrite the following sentence in plain English: 'Pursuant to the aforementioned "
    "stipulations, remuneration shall be disbursed on a fortnightly basis.'",
    "Give three arguments for and three against a four-day working week.",
    "Explain how public-key cryptography lets two strangers share a secret, without any math.",
    "Translate into French and then into Spanish: 'The library opens at nine and closes at six.'",
    "Describe what a hash table is, how collisions are handled, and when it performs badly.",
)

CHAT_PROMPTS: tuple[str, ...] = (
    "Hi! I just moved to a new city and don't know anyone. Any ideas for meeting people?",
    "I keep procrastinating on my thesis. Can you help me make a plan for this week?",
    "What's a good beginner houseplant that survives in low light? I forget to water things.",
    "Can you recommend a few science-fiction novels if I loved 'The Martian'?",
    "My sourdough never rises much. What am I probably doing wrong?",
    "Tell me a fun fact about octopuses, then ask me a question about my favourite animal.",
    "I have a job interview for a data analyst role tomorrow. What questions should I prepare for?",
    "Explain like I'm ten: why is the sky blue but sunsets are red?",
    "Plan a relaxed three-day trip to Lisbon for someone who likes food and walking.",
)

DEFAULT_PROMPTS: tuple[str, ...] = CODE_PROMPTS + MATH_PROMPTS + INSTRUCTION_PROMPTS + CHAT_PROMPTS
