// One recurrent layer over all time steps in oneDNN's RNN primitives, as XLA FFI handlers.
//
// The LSTM (vanilla_lstm, gates i, f, g, o) and the GRU (lbr_gru, PyTorch's GRU: gates
// u, r, n with n = tanh(W_n x + b_n + r * (U_n h + b_hn))) each get three handlers:
//   <cell>_infer:  x, h0, [c0], w_layer, w_iter, bias -> y, hT, [cT]
//   <cell>_train:  the same                          -> y, hT, [cT], workspace
//   <cell>_grad:   x, h0, [c0], w_layer, w_iter, bias, y, hT, [cT], workspace, dy, dhT, [dcT]
//                  -> dx, dh0, [dc0], dw_layer, dw_iter, dbias
// Shapes (float32, row-major): x[b, t, d], h0/c0/hT/cT[b, h], y[b, t, h], w_layer[d, g, h]
// (oneDNN's ldigo with l = direction = 1), w_iter[h, g, h], bias[gb, h] (ldgo),
// workspace uint8[workspace_bytes(...)]. The Python side (jaxrnn/kernels.py) arranges
// jaxrnn's parameters into these layouts; embedding, dropout, head and loss stay in XLA.
//
// Every call runs on one dedicated thread, which owns the cached primitives (one per cell,
// pass and shape) and their buffers. XLA calls from whichever of its threads is free, and
// GNU OpenMP keeps a thread team per calling thread: from many callers the teams outnumber
// the cores, libgomp stops spinning between parallel regions and each of the layer's
// per-step regions waits for its team to wake (1.3-1.5x slower, measured). With one caller
// there is one team, as in PyTorch; the XLA thread sleeps until the layer is done.

#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <queue>
#include <thread>
#include <tuple>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = memory::format_tag;
using dt = memory::data_type;

namespace {

enum class Cell : int { kLstm = 0, kGru = 1 };
enum class Pass : int { kInfer = 0, kTrain = 1, kGrad = 2 };

constexpr bool HasCellState(Cell cell) { return cell == Cell::kLstm; }
constexpr int Gates(Cell cell) { return cell == Cell::kLstm ? 4 : 3; }
constexpr int BiasGates(Cell cell) { return 4; }  // LSTM: i, f, g, o; LBR-GRU: u, r, n, n_h

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// Runs each task on one long-lived thread, in order; the caller waits for its own task.
class Worker {
 public:
  Worker() : thread_([this] { Loop(); }) {}
  void Run(const std::function<void()>& task) {
    std::packaged_task<void()> job(task);
    auto done = job.get_future();
    {
      std::lock_guard<std::mutex> lock(mu_);
      jobs_.push(std::move(job));
    }
    ready_.notify_one();
    done.get();  // rethrows what the task threw
  }

 private:
  void Loop() {
    for (;;) {
      std::packaged_task<void()> job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        ready_.wait(lock, [this] { return !jobs_.empty(); });
        job = std::move(jobs_.front());
        jobs_.pop();
      }
      job();
    }
  }
  std::mutex mu_;
  std::condition_variable ready_;
  std::queue<std::packaged_task<void()>> jobs_;
  std::thread thread_;
};

// Never destroyed: the thread lives until the process exits.
Worker& TheWorker() {
  static Worker* worker = new Worker();
  return *worker;
}

struct Shape {
  int64_t t, b, d, h;
  auto key() const { return std::make_tuple(t, b, d, h); }
};

// The plain layouts the Python side passes; `any` lets the primitive pick its own for weights.
struct Descs {
  memory::desc x, state, w_layer, w_iter, bias, y;
  Descs(Cell cell, const Shape& s, tag weights)
      : x({s.t, s.b, s.d}, dt::f32, tag::ntc),  // batch-major, as jaxrnn's layers
        state({1, 1, s.b, s.h}, dt::f32, tag::ldnc),
        w_layer({1, 1, s.d, Gates(cell), s.h}, dt::f32, weights),
        w_iter({1, 1, s.h, Gates(cell), s.h}, dt::f32, weights),
        bias({1, 1, BiasGates(cell), s.h}, dt::f32, tag::ldgo),
        y({s.t, s.b, s.h}, dt::f32, tag::ntc) {}
};

dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

constexpr auto kDir = dnnl::rnn_direction::unidirectional_left2right;

// The forward primitive descriptor of `cell` for inference or training.
dnnl::primitive_desc ForwardDesc(Cell cell, Pass pass, const Shape& s) {
  const Descs any(cell, s, tag::any);
  const auto prop = pass == Pass::kInfer ? dnnl::prop_kind::forward_inference
                                         : dnnl::prop_kind::forward_training;
  if (cell == Cell::kLstm) {
    return dnnl::lstm_forward::primitive_desc(Engine(), prop, kDir, any.x, any.state, any.state,
                                              any.w_layer, any.w_iter, any.bias, any.y,
                                              any.state, any.state, UserScratchpad());
  }
  return dnnl::lbr_gru_forward::primitive_desc(Engine(), prop, kDir, any.x, any.state,
                                               any.w_layer, any.w_iter, any.bias, any.y,
                                               any.state, UserScratchpad());
}

dnnl::primitive_desc BackwardDesc(Cell cell, const Shape& s, const dnnl::primitive_desc& fwd) {
  const Descs any(cell, s, tag::any);
  const auto bwd = dnnl::prop_kind::backward;
  if (cell == Cell::kLstm) {
    return dnnl::lstm_backward::primitive_desc(
        Engine(), bwd, kDir, any.x, any.state, any.state, any.w_layer, any.w_iter, any.bias,
        any.y, any.state, any.state, any.x, any.state, any.state, any.w_layer, any.w_iter,
        any.bias, any.y, any.state, any.state,
        static_cast<const dnnl::lstm_forward::primitive_desc&>(fwd), UserScratchpad());
  }
  return dnnl::lbr_gru_backward::primitive_desc(
      Engine(), bwd, kDir, any.x, any.state, any.w_layer, any.w_iter, any.bias, any.y,
      any.state, any.x, any.state, any.w_layer, any.w_iter, any.bias, any.y, any.state,
      static_cast<const dnnl::lbr_gru_forward::primitive_desc&>(fwd), UserScratchpad());
}

// A cached primitive with the reorders between the plain (ldigo) weights and its own layout.
struct Plan {
  dnnl::primitive_desc pd;
  dnnl::primitive prim;
  memory::desc w_layer, w_iter;  // the primitive's (diff) weight layouts
  size_t scratchpad = 0, workspace = 0;
};

Plan MakePlan(Cell cell, Pass pass, const Shape& s);

// Only the worker thread reads or fills the cache.
const Plan& GetPlan(Cell cell, Pass pass, const Shape& s) {
  static std::map<std::tuple<int, int, int64_t, int64_t, int64_t, int64_t>, std::unique_ptr<Plan>>
      cache;
  const auto key = std::tuple_cat(std::make_tuple(int(cell), int(pass)), s.key());
  auto& slot = cache[key];
  if (!slot) slot = std::make_unique<Plan>(MakePlan(cell, pass, s));
  return *slot;
}

Plan MakePlan(Cell cell, Pass pass, const Shape& s) {
  Plan plan;
  if (pass == Pass::kGrad) {
    // The hint is a fresh training descriptor, equal to the cached one (same workspace).
    plan.pd = BackwardDesc(cell, s, ForwardDesc(cell, Pass::kTrain, s));
    plan.w_layer = plan.pd.query_md(dnnl::query::diff_weights_md, 0);
    plan.w_iter = plan.pd.query_md(dnnl::query::diff_weights_md, 1);
  } else {
    plan.pd = ForwardDesc(cell, pass, s);
    plan.w_layer = plan.pd.weights_desc(0);
    plan.w_iter = plan.pd.weights_desc(1);
  }
  plan.prim = dnnl::primitive(plan.pd);
  plan.scratchpad = plan.pd.scratchpad_desc().get_size();
  plan.workspace = plan.pd.workspace_desc().get_size();
  return plan;
}

// The worker's buffers, grown as needed: scratchpad, weights in the primitive's layouts.
std::vector<uint8_t>& Buffer(int which) {
  static std::vector<uint8_t> buffers[5];
  return buffers[which];
}

void* Ptr(const ffi::AnyBuffer& buffer) { return const_cast<void*>(buffer.untyped_data()); }

memory Wrap(const memory::desc& desc, void* ptr) { return memory(desc, Engine(), ptr); }

// `user` (plain layout) as a memory in `want`'s layout, reordered into a thread buffer if needed.
memory InLayout(dnnl::stream& stream, const memory& user, const memory::desc& want, int buffer) {
  if (user.get_desc() == want) return user;
  auto& storage = Buffer(buffer);
  storage.resize(want.get_size());
  memory mem = Wrap(want, storage.data());
  dnnl::reorder(user, mem).execute(stream, const_cast<memory&>(user), mem);
  return mem;
}

Shape ShapeOf(const ffi::AnyBuffer& x, const ffi::AnyBuffer& h0) {
  const auto xd = x.dimensions(), hd = h0.dimensions();
  return Shape{xd[1], xd[0], xd[2], hd[1]};
}

template <Cell cell, Pass pass>
ffi::Error Forward(ffi::RemainingArgs args, ffi::RemainingRets rets) {
  constexpr int c = HasCellState(cell);
  try {
    TheWorker().Run([&] {
    auto arg = [&](size_t i) { return args.get<ffi::AnyBuffer>(i).value(); };
    auto ret = [&](size_t i) { return *rets.get<ffi::AnyBuffer>(i).value(); };
    const Shape s = ShapeOf(arg(0), arg(1));
    const Plan& plan = GetPlan(cell, pass, s);
    const Descs plain(cell, s, tag::ldigo);
    dnnl::stream stream(Engine());
    Buffer(0).resize(plan.scratchpad);
    std::unordered_map<int, memory> io = {
        {DNNL_ARG_SRC_LAYER, Wrap(plain.x, Ptr(arg(0)))},
        {DNNL_ARG_SRC_ITER, Wrap(plain.state, Ptr(arg(1)))},
        {DNNL_ARG_WEIGHTS_LAYER,
         InLayout(stream, Wrap(plain.w_layer, Ptr(arg(1 + c + 1))), plan.w_layer, 1)},
        {DNNL_ARG_WEIGHTS_ITER,
         InLayout(stream, Wrap(plain.w_iter, Ptr(arg(1 + c + 2))), plan.w_iter, 2)},
        {DNNL_ARG_BIAS, Wrap(plain.bias, Ptr(arg(1 + c + 3)))},
        {DNNL_ARG_DST_LAYER, Wrap(plain.y, Ptr(ret(0)))},
        {DNNL_ARG_DST_ITER, Wrap(plain.state, Ptr(ret(1)))},
        {DNNL_ARG_SCRATCHPAD, Wrap(plan.pd.scratchpad_desc(), Buffer(0).data())},
    };
    if (c) {
      io[DNNL_ARG_SRC_ITER_C] = Wrap(plain.state, Ptr(arg(2)));
      io[DNNL_ARG_DST_ITER_C] = Wrap(plain.state, Ptr(ret(2)));
    }
    if (pass == Pass::kTrain) io[DNNL_ARG_WORKSPACE] = Wrap(plan.pd.workspace_desc(), Ptr(ret(2 + c)));
    plan.prim.execute(stream, io);
    stream.wait();
    });
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("jaxrnn oneDNN forward: ") + e.what());
  }
  return ffi::Error::Success();
}

template <Cell cell>
ffi::Error Backward(ffi::RemainingArgs args, ffi::RemainingRets rets) {
  constexpr int c = HasCellState(cell);
  try {
    TheWorker().Run([&] {
    auto arg = [&](size_t i) { return args.get<ffi::AnyBuffer>(i).value(); };
    auto ret = [&](size_t i) { return *rets.get<ffi::AnyBuffer>(i).value(); };
    const Shape s = ShapeOf(arg(0), arg(1));
    const Plan& plan = GetPlan(cell, Pass::kGrad, s);
    const Descs plain(cell, s, tag::ldigo);
    dnnl::stream stream(Engine());
    Buffer(0).resize(plan.scratchpad);
    // Inputs: x, h0, [c0], w_layer, w_iter, bias, y, hT, [cT], workspace, dy, dhT, [dcT].
    const int w = 2 + c, out = w + 3, ws = out + 2 + c, d_out = ws + 1;
    // Outputs: dx, dh0, [dc0], dw_layer, dw_iter, dbias.
    const int dw = 2 + c;
    const memory::desc want_layer = plan.pd.weights_desc(0), want_iter = plan.pd.weights_desc(1);
    memory dw_layer_user = Wrap(plain.w_layer, Ptr(ret(dw)));
    memory dw_iter_user = Wrap(plain.w_iter, Ptr(ret(dw + 1)));
    // oneDNN accumulates into the weight gradients: they start at zero.
    const bool own_layer = !(plan.w_layer == plain.w_layer), own_iter = !(plan.w_iter == plain.w_iter);
    if (own_layer) Buffer(3).assign(plan.w_layer.get_size(), 0);
    if (own_iter) Buffer(4).assign(plan.w_iter.get_size(), 0);
    memory dw_layer = own_layer ? Wrap(plan.w_layer, Buffer(3).data()) : dw_layer_user;
    memory dw_iter = own_iter ? Wrap(plan.w_iter, Buffer(4).data()) : dw_iter_user;
    if (!own_layer) std::memset(Ptr(ret(dw)), 0, plain.w_layer.get_size());
    if (!own_iter) std::memset(Ptr(ret(dw + 1)), 0, plain.w_iter.get_size());
    std::memset(Ptr(ret(dw + 2)), 0, plain.bias.get_size());
    std::unordered_map<int, memory> io = {
        {DNNL_ARG_SRC_LAYER, Wrap(plain.x, Ptr(arg(0)))},
        {DNNL_ARG_SRC_ITER, Wrap(plain.state, Ptr(arg(1)))},
        {DNNL_ARG_WEIGHTS_LAYER, InLayout(stream, Wrap(plain.w_layer, Ptr(arg(w))), want_layer, 1)},
        {DNNL_ARG_WEIGHTS_ITER, InLayout(stream, Wrap(plain.w_iter, Ptr(arg(w + 1))), want_iter, 2)},
        {DNNL_ARG_BIAS, Wrap(plain.bias, Ptr(arg(w + 2)))},
        {DNNL_ARG_DST_LAYER, Wrap(plain.y, Ptr(arg(out)))},
        {DNNL_ARG_DST_ITER, Wrap(plain.state, Ptr(arg(out + 1)))},
        {DNNL_ARG_WORKSPACE, Wrap(plan.pd.workspace_desc(), Ptr(arg(ws)))},
        {DNNL_ARG_DIFF_DST_LAYER, Wrap(plain.y, Ptr(arg(d_out)))},
        {DNNL_ARG_DIFF_DST_ITER, Wrap(plain.state, Ptr(arg(d_out + 1)))},
        {DNNL_ARG_DIFF_SRC_LAYER, Wrap(plain.x, Ptr(ret(0)))},
        {DNNL_ARG_DIFF_SRC_ITER, Wrap(plain.state, Ptr(ret(1)))},
        {DNNL_ARG_DIFF_WEIGHTS_LAYER, dw_layer},
        {DNNL_ARG_DIFF_WEIGHTS_ITER, dw_iter},
        {DNNL_ARG_DIFF_BIAS, Wrap(plain.bias, Ptr(ret(dw + 2)))},
        {DNNL_ARG_SCRATCHPAD, Wrap(plan.pd.scratchpad_desc(), Buffer(0).data())},
    };
    if (c) {
      io[DNNL_ARG_SRC_ITER_C] = Wrap(plain.state, Ptr(arg(2)));
      io[DNNL_ARG_DST_ITER_C] = Wrap(plain.state, Ptr(arg(out + 2)));
      io[DNNL_ARG_DIFF_DST_ITER_C] = Wrap(plain.state, Ptr(arg(d_out + 2)));
      io[DNNL_ARG_DIFF_SRC_ITER_C] = Wrap(plain.state, Ptr(ret(2)));
    }
    plan.prim.execute(stream, io);
    if (own_layer) dnnl::reorder(dw_layer, dw_layer_user).execute(stream, dw_layer, dw_layer_user);
    if (own_iter) dnnl::reorder(dw_iter, dw_iter_user).execute(stream, dw_iter, dw_iter_user);
    stream.wait();
    });
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("jaxrnn oneDNN backward: ") + e.what());
  }
  return ffi::Error::Success();
}

}  // namespace

#define JAXRNN_HANDLER(symbol, fn) \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(symbol, fn, ffi::Ffi::Bind().RemainingArgs().RemainingRets())

JAXRNN_HANDLER(jaxrnn_lstm_infer, (Forward<Cell::kLstm, Pass::kInfer>));
JAXRNN_HANDLER(jaxrnn_lstm_train, (Forward<Cell::kLstm, Pass::kTrain>));
JAXRNN_HANDLER(jaxrnn_lstm_grad, Backward<Cell::kLstm>);
JAXRNN_HANDLER(jaxrnn_gru_infer, (Forward<Cell::kGru, Pass::kInfer>));
JAXRNN_HANDLER(jaxrnn_gru_train, (Forward<Cell::kGru, Pass::kTrain>));
JAXRNN_HANDLER(jaxrnn_gru_grad, Backward<Cell::kGru>);

// The training forward's workspace size in bytes (0 on error), read by Python at trace time.
extern "C" int64_t jaxrnn_workspace_bytes(int cell, int64_t t, int64_t b, int64_t d, int64_t h) {
  try {
    int64_t bytes = 0;
    TheWorker().Run([&] { bytes = GetPlan(Cell(cell), Pass::kTrain, Shape{t, b, d, h}).workspace; });
    return bytes;
  } catch (const std::exception&) {
    return 0;
  }
}
