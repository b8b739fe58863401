//! A pickle reader for the `data.pkl` of a `torch.save` state dict, that executes nothing.
//!
//! It knows exactly the opcodes `torch.save` emits for a dict of tensors (protocols 2 to 5) and a
//! whitelist of Python globals: `collections.OrderedDict`, the tensor rebuild functions, the
//! storage classes and the `torch` dtype objects. Any other global is refused by name where it
//! appears, so a pickle that would run code (`os.system`, `builtins.eval`, ...) is an error,
//! never a call. Values live in an arena addressed by index: shared and even cyclic references
//! cost nothing, and no step recurses into nested values, so no input can exhaust the stack.

use std::collections::HashMap;
use std::rc::Rc;

use crate::dtype::Dtype;
use crate::torch_globals::{resolve_global, Global};

/// A `torch.save` storage, as its persistent id names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StorageRef {
    /// Key of the storage: its data is the archive entry `<archive>/data/<key>`.
    pub key: String,
    /// Element type of the storage (`U8` for an untyped storage).
    pub dtype: Dtype,
    /// Number of elements of the storage.
    pub numel: u64,
}

/// A tensor of the state dict: a strided view of a storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TensorRef {
    /// The storage holding its elements.
    pub storage: StorageRef,
    /// Element type of the tensor (that of the storage, or the dtype argument of
    /// `_rebuild_tensor_v3` for an untyped storage).
    pub dtype: Dtype,
    /// Offset of the first element, in elements of `dtype`.
    pub offset: u64,
    /// Shape.
    pub shape: Vec<u64>,
    /// Strides, in elements.
    pub stride: Vec<u64>,
}

/// Why a `data.pkl` could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PickleError {
    /// The pickle refers to a global outside the whitelist (`module.name`).
    Forbidden(String),
    /// Anything else: malformed, truncated, or not a state dict of tensors.
    Bad(String),
}

type PResult<T> = Result<T, PickleError>;

fn bad<T>(reason: impl Into<String>) -> PResult<T> {
    Err(PickleError::Bad(reason.into()))
}

/// A value on the stack or in the memo. Containers are indices into the arena, so copying a
/// value (`BINGET`) is O(1) and sharing never duplicates anything.
#[derive(Debug, Clone)]
enum V {
    None,
    Bool,
    Int(i64),
    Float,
    Str(Rc<str>),
    Global(Global),
    Obj(usize),
}

#[derive(Debug)]
enum Obj {
    Tuple(Vec<V>),
    List(Vec<V>),
    Dict(Vec<(V, V)>),
    Storage(StorageRef),
    Tensor(TensorRef),
}

fn kind(v: &V, arena: &[Obj]) -> &'static str {
    match v {
        V::None => "None",
        V::Bool => "a bool",
        V::Int(_) => "an int",
        V::Float => "a float",
        V::Str(_) => "a string",
        V::Global(_) => "a class or function",
        V::Obj(i) => match arena[*i] {
            Obj::Tuple(_) => "a tuple",
            Obj::List(_) => "a list",
            Obj::Dict(_) => "a dict",
            Obj::Storage(_) => "a storage",
            Obj::Tensor(_) => "a tensor",
        },
    }
}

struct Machine<'a> {
    input: &'a [u8],
    pos: usize,
    stack: Vec<V>,
    marks: Vec<usize>,
    memo: HashMap<u32, V>,
    arena: Vec<Obj>,
}

impl<'a> Machine<'a> {
    fn take(&mut self, n: usize) -> PResult<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.input.len());
        let Some(end) = end else {
            return bad(format!(
                "truncated: an opcode at byte {} needs {n} more bytes, only {} are left",
                self.pos,
                self.input.len() - self.pos
            ));
        };
        let s = &self.input[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> PResult<u8> {
        Ok(self.take(1)?[0])
    }

    fn le(&mut self, n: usize) -> PResult<u64> {
        let mut b = [0u8; 8];
        b[..n].copy_from_slice(self.take(n)?);
        Ok(u64::from_le_bytes(b))
    }

    fn len(&mut self, n: usize) -> PResult<usize> {
        let v = self.le(n)?;
        usize::try_from(v).or_else(|_| bad(format!("length {v} too large")))
    }

    fn string(&mut self, n: usize) -> PResult<Rc<str>> {
        let at = self.pos;
        let bytes = self.take(n)?;
        std::str::from_utf8(bytes)
            .map(Rc::from)
            .or_else(|_| bad(format!("string at byte {at} is not UTF-8")))
    }

    fn line(&mut self) -> PResult<&'a str> {
        let rest = &self.input[self.pos..];
        let Some(n) = rest.iter().position(|&b| b == b'\n') else {
            return bad(format!(
                "truncated: unterminated GLOBAL at byte {}",
                self.pos
            ));
        };
        let s = std::str::from_utf8(&rest[..n])
            .or_else(|_| bad(format!("GLOBAL name at byte {} is not UTF-8", self.pos)))?;
        self.pos += n + 1;
        Ok(s)
    }

    fn push_obj(&mut self, o: Obj) {
        self.arena.push(o);
        self.stack.push(V::Obj(self.arena.len() - 1));
    }

    fn pop(&mut self) -> PResult<V> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return bad(format!("stack underflow at byte {}", self.pos - 1));
        }
        Ok(self.stack.pop().expect("checked above"))
    }

    fn pop_mark(&mut self) -> PResult<Vec<V>> {
        let Some(m) = self.marks.pop() else {
            return bad(format!("no MARK before byte {}", self.pos - 1));
        };
        Ok(self.stack.split_off(m))
    }

    fn top_obj(&mut self, what: &str) -> PResult<&mut Obj> {
        let floor = self.marks.last().copied().unwrap_or(0);
        match self.stack.last() {
            Some(V::Obj(i)) if self.stack.len() > floor => Ok(&mut self.arena[*i]),
            Some(v) if self.stack.len() > floor => {
                bad(format!("{what} on {}", kind(v, &self.arena)))
            }
            _ => bad(format!("{what} on an empty stack")),
        }
    }

    fn memo_get(&self, key: u32) -> PResult<V> {
        self.memo
            .get(&key)
            .cloned()
            .ok_or_else(|| PickleError::Bad(format!("memo key {key} read before it is written")))
    }

    fn memo_put(&mut self, key: u32) -> PResult<()> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return bad(format!("memoizing an empty stack at byte {}", self.pos));
        }
        let v = self.stack.last().cloned().expect("checked above");
        self.memo.insert(key, v);
        Ok(())
    }

    fn tuple(&self, v: &V, what: &str) -> PResult<&[V]> {
        match v {
            V::Obj(i) => match &self.arena[*i] {
                Obj::Tuple(t) => Ok(t),
                _ => bad(format!("{what} is {}, not a tuple", kind(v, &self.arena))),
            },
            _ => bad(format!("{what} is {}, not a tuple", kind(v, &self.arena))),
        }
    }

    fn uint(&self, v: &V, what: &str) -> PResult<u64> {
        match v {
            V::Int(i) if *i >= 0 => Ok(*i as u64),
            V::Int(i) => bad(format!("{what} is negative ({i})")),
            _ => bad(format!("{what} is {}, not an int", kind(v, &self.arena))),
        }
    }

    fn uints(&self, v: &V, what: &str) -> PResult<Vec<u64>> {
        self.tuple(v, what)?
            .iter()
            .map(|d| self.uint(d, what))
            .collect()
    }

    fn tensor(&self, v: &V, what: &str) -> PResult<TensorRef> {
        match v {
            V::Obj(i) => match &self.arena[*i] {
                Obj::Tensor(t) => Ok(t.clone()),
                _ => bad(format!("{what} is {}, not a tensor", kind(v, &self.arena))),
            },
            _ => bad(format!("{what} is {}, not a tensor", kind(v, &self.arena))),
        }
    }

    /// `_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])`, or
    /// v3 with the dtype after the hooks. Hooks and metadata carry nothing the split needs.
    fn rebuild_tensor(&self, args: &[V], v3: bool) -> PResult<TensorRef> {
        let name = if v3 { "v3" } else { "v2" };
        let n = if v3 { 7 } else { 6 };
        if args.len() != n && args.len() != n + 1 {
            return bad(format!(
                "_rebuild_tensor_{name} called with {} arguments, expected {n} or {}",
                args.len(),
                n + 1
            ));
        }
        let storage = match &args[0] {
            V::Obj(i) => match &self.arena[*i] {
                Obj::Storage(s) => s.clone(),
                _ => return bad(format!("tensor storage is {}", kind(&args[0], &self.arena))),
            },
            v => return bad(format!("tensor storage is {}", kind(v, &self.arena))),
        };
        let dtype = if v3 {
            match &args[6] {
                V::Global(Global::TorchDtype(d)) => *d,
                v => return bad(format!("tensor dtype is {}", kind(v, &self.arena))),
            }
        } else {
            storage.dtype
        };
        let shape = self.uints(&args[2], "tensor size")?;
        let stride = self.uints(&args[3], "tensor stride")?;
        if shape.len() != stride.len() {
            return bad(format!(
                "tensor size {shape:?} and stride {stride:?} differ in length"
            ));
        }
        Ok(TensorRef {
            storage,
            dtype,
            offset: self.uint(&args[1], "tensor storage offset")?,
            shape,
            stride,
        })
    }

    fn reduce(&mut self) -> PResult<()> {
        let args = self.pop()?;
        let func = self.pop()?;
        let V::Global(g) = func else {
            return bad(format!(
                "REDUCE calls {}, not a class or function",
                kind(&func, &self.arena)
            ));
        };
        let args = self.tuple(&args, "REDUCE arguments")?.to_vec();
        let args = args.as_slice();
        match g {
            Global::OrderedDict if args.is_empty() => {
                self.push_obj(Obj::Dict(Vec::new()));
                Ok(())
            }
            Global::OrderedDict => bad("OrderedDict called with arguments"),
            Global::RebuildTensorV2 | Global::RebuildTensorV3 => {
                let t = self.rebuild_tensor(args, g == Global::RebuildTensorV3)?;
                self.push_obj(Obj::Tensor(t));
                Ok(())
            }
            Global::RebuildParameter | Global::RebuildParameterWithState => {
                let n = if g == Global::RebuildParameter { 3 } else { 4 };
                if args.len() != n {
                    return bad(format!(
                        "_rebuild_parameter called with {} arguments, expected {n}",
                        args.len()
                    ));
                }
                // A parameter is its data tensor (`requires_grad` and hooks do not matter here).
                let t = self.tensor(&args[0], "parameter data")?;
                self.push_obj(Obj::Tensor(t));
                Ok(())
            }
            Global::Storage(_) | Global::TorchDtype(_) => {
                bad("REDUCE calls a storage class or dtype")
            }
        }
    }

    /// `BINPERSID` of `torch.save`: `('storage', storage_type, key, location, numel)`.
    fn persistent_load(&mut self) -> PResult<()> {
        let pid = self.pop()?;
        let t = self.tuple(&pid, "persistent id")?;
        let storage = match t {
            [V::Str(tag), V::Global(Global::Storage(dtype)), V::Str(key), V::Str(_location), numel]
                if &**tag == "storage" =>
            {
                StorageRef {
                    key: key.to_string(),
                    dtype: *dtype,
                    numel: self.uint(numel, "storage size")?,
                }
            }
            _ => {
                return bad("persistent id is not ('storage', <storage type>, key, location, size)")
            }
        };
        self.push_obj(Obj::Storage(storage));
        Ok(())
    }

    fn step(&mut self, op: u8) -> PResult<bool> {
        match op {
            0x80 => {
                let proto = self.u8()?;
                if !(2..=5).contains(&proto) {
                    return bad(format!(
                        "pickle protocol {proto} (torch.save writes 2 to 5)"
                    ));
                }
            }
            0x95 => {
                self.take(8)?; // FRAME: only a read-ahead hint
            }
            b'.' => return Ok(true),
            b'}' => self.push_obj(Obj::Dict(Vec::new())),
            b']' => self.push_obj(Obj::List(Vec::new())),
            b')' => self.push_obj(Obj::Tuple(Vec::new())),
            b'(' => self.marks.push(self.stack.len()),
            b't' => {
                let items = self.pop_mark()?;
                self.push_obj(Obj::Tuple(items));
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.pop()?);
                }
                items.reverse();
                self.push_obj(Obj::Tuple(items));
            }
            b'X' | 0x8c | 0x8d => {
                let n = match op {
                    b'X' => self.len(4)?,
                    0x8c => self.len(1)?,
                    _ => self.len(8)?,
                };
                let s = self.string(n)?;
                self.stack.push(V::Str(s));
            }
            b'J' => {
                let v = self.le(4)? as u32 as i32;
                self.stack.push(V::Int(v.into()));
            }
            b'K' => {
                let v = self.le(1)?;
                self.stack.push(V::Int(v as i64));
            }
            b'M' => {
                let v = self.le(2)?;
                self.stack.push(V::Int(v as i64));
            }
            0x8a | 0x8b => {
                let n = if op == 0x8a {
                    self.len(1)?
                } else {
                    self.len(4)?
                };
                let bytes = self.take(n)?;
                if n > 8 {
                    return bad(format!("integer of {n} bytes is too large"));
                }
                let mut b = [0u8; 8];
                b[..n].copy_from_slice(bytes);
                if n > 0 && bytes[n - 1] & 0x80 != 0 {
                    b[n..].fill(0xff); // two's complement: sign-extend
                }
                self.stack.push(V::Int(i64::from_le_bytes(b)));
            }
            b'G' => {
                self.take(8)?;
                self.stack.push(V::Float);
            }
            0x88 | 0x89 => self.stack.push(V::Bool),
            b'N' => self.stack.push(V::None),
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                let g = resolve_global(module, name)?;
                self.stack.push(V::Global(g));
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                let (V::Str(module), V::Str(name)) = (&module, &name) else {
                    return bad("STACK_GLOBAL of values that are not strings");
                };
                let g = resolve_global(module, name)?;
                self.stack.push(V::Global(g));
            }
            b'R' => self.reduce()?,
            b'b' => {
                self.pop()?;
                // The state of an OrderedDict is its attributes (`_metadata` of a state dict),
                // that of a tensor its Python attributes: neither matters to the split.
                match self.top_obj("BUILD")? {
                    Obj::Dict(_) | Obj::Tensor(_) => {}
                    _ => return bad("BUILD on something that is not a dict or tensor"),
                }
            }
            b'Q' => self.persistent_load()?,
            b'q' => {
                let k = self.le(1)? as u32;
                self.memo_put(k)?;
            }
            b'r' => {
                let k = self.le(4)? as u32;
                self.memo_put(k)?;
            }
            0x94 => {
                let k = u32::try_from(self.memo.len()).or_else(|_| bad("memo too large"))?;
                self.memo_put(k)?;
            }
            b'h' => {
                let k = self.le(1)? as u32;
                let v = self.memo_get(k)?;
                self.stack.push(v);
            }
            b'j' => {
                let k = self.le(4)? as u32;
                let v = self.memo_get(k)?;
                self.stack.push(v);
            }
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                match self.top_obj("SETITEM")? {
                    Obj::Dict(d) => d.push((k, v)),
                    _ => return bad("SETITEM on something that is not a dict"),
                }
            }
            b'u' => {
                let items = self.pop_mark()?;
                if items.len() % 2 != 0 {
                    return bad("SETITEMS with an odd number of items");
                }
                let mut it = items.into_iter();
                let pairs: Vec<(V, V)> =
                    std::iter::from_fn(|| Some((it.next()?, it.next()?))).collect();
                match self.top_obj("SETITEMS")? {
                    Obj::Dict(d) => d.extend(pairs),
                    _ => return bad("SETITEMS on something that is not a dict"),
                }
            }
            b'a' => {
                let v = self.pop()?;
                match self.top_obj("APPEND")? {
                    Obj::List(l) => l.push(v),
                    _ => return bad("APPEND on something that is not a list"),
                }
            }
            b'e' => {
                let items = self.pop_mark()?;
                match self.top_obj("APPENDS")? {
                    Obj::List(l) => l.extend(items),
                    _ => return bad("APPENDS on something that is not a list"),
                }
            }
            b'0' => {
                self.pop()?;
            }
            b'1' => {
                self.pop_mark()?;
            }
            _ => {
                return bad(format!(
                    "unsupported pickle opcode 0x{op:02x} at byte {} (not one torch.save writes \
                     for a state dict)",
                    self.pos - 1
                ))
            }
        }
        Ok(false)
    }
}

/// Reads the `data.pkl` of a `torch.save`d state dict: a dict (or `OrderedDict`) from tensor
/// names to tensors, returned in the pickle's order.
pub(crate) fn read_state_dict(input: &[u8]) -> PResult<Vec<(String, TensorRef)>> {
    let mut m = Machine {
        input,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        arena: Vec::new(),
    };
    loop {
        if m.pos >= input.len() {
            return bad(format!(
                "truncated: ends after {} bytes without the STOP opcode",
                input.len()
            ));
        }
        let op = m.input[m.pos];
        m.pos += 1;
        if m.step(op)? {
            break;
        }
    }
    if m.stack.len() != 1 || !m.marks.is_empty() {
        return bad(format!(
            "STOP with {} values on the stack (expected exactly the state dict)",
            m.stack.len()
        ));
    }
    let top = m.stack.pop().expect("one value");
    let V::Obj(i) = top else {
        return bad(format!(
            "the pickle holds {}, not a state dict (a dict of tensors)",
            kind(&top, &m.arena)
        ));
    };
    let Obj::Dict(entries) = &m.arena[i] else {
        return bad(format!(
            "the pickle holds {}, not a state dict (a dict of tensors)",
            kind(&top, &m.arena)
        ));
    };
    let mut out = Vec::with_capacity(entries.len());
    let mut seen = std::collections::HashSet::new();
    for (k, v) in entries {
        let V::Str(name) = k else {
            return bad(format!(
                "the state dict has a key that is {}, not a tensor name",
                kind(k, &m.arena)
            ));
        };
        if !seen.insert(name.clone()) {
            return bad(format!("the state dict lists {name} twice"));
        }
        let t = m.tensor(v, &format!("state dict entry {name}"))?;
        out.push((name.to_string(), t));
    }
    Ok(out)
}
