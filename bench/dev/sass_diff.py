"""Compares two `cuobjdump -sass` dumps (e.g. of effattn/_C.abi3.so before and after a change) function by function
encodings and the fatbin headers' file paths dropped). Usage: sassdiff.py BASE NEW"""
import re
import sys
from collections import Counter


def parse(path):
    funcs, arch, key, body = {}, None, None, []
    for line in open(path):
        m = re.match(r"\s*arch = (sm_\w+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            if key:
                funcs[key] = body
            key, body = (arch, m.group(1)), []
            continue
        if key is not None and ";" in line:
            ins = re.sub(r"/\*[0-9a-f]{4,}\*/", "", line)
            ins = re.sub(r"/\* 0x[0-9a-f]+ \*/", "", ins).strip()
            body.append(ins)
    if key:
        funcs[key] = body
    return funcs


base, new = parse(sys.argv[1]), parse(sys.argv[2])
common = sorted(set(base) & set(new))
diff = [k for k in common if base[k] != new[k]]
print(f"functions: base {len(base)}, new {len(new)}, in both {len(common)}, identical {len(common) - len(diff)}, "
      f"different {len(diff)}")
for label, keys in (("only in base", sorted(set(base) - set(new))), ("only in new", sorted(set(new) - set(base)))):
    kinds = Counter(re.sub(r"I.*", "", n.replace("_ZN7effattn4cuda", ""))[2:] for _, n in keys)
    print(f"{label}: {len(keys)}", dict(kinds))
for arch, name in diff:
    print("DIFFERENT", arch, name)
