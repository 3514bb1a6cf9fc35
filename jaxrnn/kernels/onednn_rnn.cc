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
// workspace uint8[workspace_bytes(...)]. The Python side (jaxrnn/kernels/__init__.py) arranges
// jaxrnn's parameters into these layouts; embedding, dropout, head and loss stay in XLA.
//
// Every call runs on one dedicated thread, which owns the cached primitives (one per cell,
// pass and shape) and their buffers. XLA calls from whichever of its threads is free, and
// GNU OpenMP keeps a thread team per calling thread: from many callers the teams outnumber
// the cores, libgomp stops spinning between parallel regions and each of the layer's
// per-step regions waits for its team to wake (a 2 x 256 layer's evaluation: 43 ms, against
// 24 ms from one thread). With one caller
// there is one team, as in PyTorch; the XLA thread sleeps until the layer is done.

#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <queue>
#include <thread>
#include <tuple>
#include <unordered_map>
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
constexpr int kBiasGates = 4;  // LSTM: i, f, g, o; LBR-GRU: u, r, n and n's recurrent bias

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
        bias({1, 1, kBiasGates, s.h}, dt::f32, tag::ldgo),
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

// A cached primitive with the reorders between jaxrnn's plain weight layouts (ldigo) and the
// primitive's own: weights in (all passes), weight gradients out (backward).
struct Plan {
  dnnl::primitive_desc pd;
  dnnl::primitive prim;
  memory::desc weights[2];        // the primitive's layer / iter weight layouts
  memory::desc diff_weights[2];   // backward: its weight-gradient layouts
  std::optional<dnnl::reorder> to_weights[2], from_diff_weights[2];  // unset: plain already
};

std::optional<dnnl::reorder> Reorder(const memory::desc& from, const memory::desc& to) {
  if (from == to) return std::nullopt;
  return dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), from, Engine(), to));
}

Plan MakePlan(Cell cell, Pass pass, const Shape& s) {
  Plan plan;
  const Descs plain(cell, s, tag::ldigo);
  const memory::desc plain_weights[2] = {plain.w_layer, plain.w_iter};
  // The backward's hint is a fresh training descriptor, equal to the cached one (same workspace).
  plan.pd = pass == Pass::kGrad ? BackwardDesc(cell, s, ForwardDesc(cell, Pass::kTrain, s))
                                : ForwardDesc(cell, pass, s);
  plan.prim = dnnl::primitive(plan.pd);
  for (int i = 0; i < 2; ++i) {
    plan.weights[i] = plan.pd.weights_desc(i);
    plan.to_weights[i] = Reorder(plain_weights[i], plan.weights[i]);
    if (pass == Pass::kGrad) {
      plan.diff_weights[i] = plan.pd.query_md(dnnl::query::diff_weights_md, i);
      plan.from_diff_weights[i] = Reorder(plan.diff_weights[i], plain_weights[i]);
    }
  }
  return plan;
}

// Only the worker thread reads or fills the cache.
const Plan& GetPlan(Cell cell, Pass pass, const Shape& s) {
  static std::map<std::tuple<int, int, int64_t, int64_t, int64_t, int64_t>, std::unique_ptr<Plan>>
      cache;
  const auto key = std::tuple_cat(std::make_tuple(int(cell), int(pass)), s.key());
  auto& slot = cache[key];
  if (!slot) slot = std::make_unique<Plan>(MakePlan(cell, pass, s));
  return *slot;
}

// The worker's scratch memory by use, grown when a call needs more and otherwise reused as it
// is: no allocation, page faults or clearing per call.
enum Use { kScratchpad, kWeights, kDiffWeights = kWeights + 2, kUses = kDiffWeights + 2 };

void* Scratch(int use, size_t bytes) {
  static std::vector<uint8_t> buffers[kUses];
  if (buffers[use].size() < bytes) buffers[use].resize(bytes);
  return buffers[use].data();
}

void* Ptr(const ffi::AnyBuffer& buffer) { return const_cast<void*>(buffer.untyped_data()); }

memory Wrap(const memory::desc& desc, void* ptr) { return memory(desc, Engine(), ptr); }

Shape ShapeOf(const ffi::AnyBuffer& x, const ffi::AnyBuffer& h0) {
  const auto xd = x.dimensions(), hd = h0.dimensions();
  return Shape{xd[1], xd[0], xd[2], hd[1]};
}

// Zero steps, which oneDNN's primitives do not run (they fail, or leave the outputs as XLA
// allocated them), are written by the handlers: a state, or its gradient, passed through
// (rets[to] = args[from]), and zero weight gradients.
bool NoSteps(const ffi::RemainingArgs& args) {
  return args.get<ffi::AnyBuffer>(0).value().dimensions()[1] == 0;
}

void CopyArg(const ffi::RemainingArgs& args, int from, ffi::RemainingRets& rets, int to) {
  const ffi::AnyBuffer arg = args.get<ffi::AnyBuffer>(from).value();
  std::memcpy(Ptr(*rets.get<ffi::AnyBuffer>(to).value()), Ptr(arg), arg.size_bytes());
}

void ZeroRet(ffi::RemainingRets& rets, int i) {
  const ffi::AnyBuffer ret = *rets.get<ffi::AnyBuffer>(i).value();
  std::memset(Ptr(ret), 0, ret.size_bytes());
}

// What both passes bind: inputs x, h0, [c0], w_layer, w_iter, bias (args 0..), weights put
// in the primitive's layouts by the plan's reorders.
std::unordered_map<int, memory> BindInputs(const Plan& plan, const Descs& plain, bool c,
                                           dnnl::stream& stream, const ffi::RemainingArgs& args) {
  auto arg = [&](size_t i) { return Ptr(args.get<ffi::AnyBuffer>(i).value()); };
  const int w = 2 + c;
  const memory::desc plain_weights[2] = {plain.w_layer, plain.w_iter};
  std::unordered_map<int, memory> io = {
      {DNNL_ARG_SRC_LAYER, Wrap(plain.x, arg(0))},
      {DNNL_ARG_SRC_ITER, Wrap(plain.state, arg(1))},
      {DNNL_ARG_BIAS, Wrap(plain.bias, arg(w + 2))},
      {DNNL_ARG_SCRATCHPAD,
       Wrap(plan.pd.scratchpad_desc(), Scratch(kScratchpad, plan.pd.scratchpad_desc().get_size()))},
  };
  if (c) io[DNNL_ARG_SRC_ITER_C] = Wrap(plain.state, arg(2));
  const int weight_args[2] = {DNNL_ARG_WEIGHTS_LAYER, DNNL_ARG_WEIGHTS_ITER};
  for (int i = 0; i < 2; ++i) {
    memory user = Wrap(plain_weights[i], arg(w + i));
    if (!plan.to_weights[i]) {
      io[weight_args[i]] = user;
      continue;
    }
    memory mine = Wrap(plan.weights[i], Scratch(kWeights + i, plan.weights[i].get_size()));
    plan.to_weights[i]->execute(stream, user, mine);
    io[weight_args[i]] = mine;
  }
  return io;
}

template <Cell cell, Pass pass>
ffi::Error Forward(ffi::RemainingArgs args, ffi::RemainingRets rets) {
  constexpr bool c = HasCellState(cell);
  if (NoSteps(args)) {  // hT = h0, [cT = c0]
    for (int i = 1; i <= 1 + c; ++i) CopyArg(args, i, rets, i);
    return ffi::Error::Success();
  }
  try {
    TheWorker().Run([&] {
      auto ret = [&](size_t i) { return Ptr(*rets.get<ffi::AnyBuffer>(i).value()); };
      const Shape s = ShapeOf(args.get<ffi::AnyBuffer>(0).value(),
                              args.get<ffi::AnyBuffer>(1).value());
      const Plan& plan = GetPlan(cell, pass, s);
      const Descs plain(cell, s, tag::ldigo);
      dnnl::stream stream(Engine());
      auto io = BindInputs(plan, plain, c, stream, args);
      io[DNNL_ARG_DST_LAYER] = Wrap(plain.y, ret(0));
      io[DNNL_ARG_DST_ITER] = Wrap(plain.state, ret(1));
      if (c) io[DNNL_ARG_DST_ITER_C] = Wrap(plain.state, ret(2));
      if (pass == Pass::kTrain) io[DNNL_ARG_WORKSPACE] = Wrap(plan.pd.workspace_desc(), ret(2 + c));
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
  constexpr bool c = HasCellState(cell);
  // Inputs after the weights: y, hT, [cT], workspace, dy, dhT, [dcT].
  const int out = 5 + c, ws = out + 2 + c, d_out = ws + 1;
  if (NoSteps(args)) {  // dh0 = dhT, [dc0 = dcT]; dw_layer, dw_iter, dbias = 0
    for (int i = 0; i <= c; ++i) CopyArg(args, d_out + 1 + i, rets, 1 + i);
    for (int i = 2 + c; i < 5 + c; ++i) ZeroRet(rets, i);
    return ffi::Error::Success();
  }
  try {
    TheWorker().Run([&] {
      auto arg = [&](size_t i) { return Ptr(args.get<ffi::AnyBuffer>(i).value()); };
      auto ret = [&](size_t i) { return Ptr(*rets.get<ffi::AnyBuffer>(i).value()); };
      const Shape s = ShapeOf(args.get<ffi::AnyBuffer>(0).value(),
                              args.get<ffi::AnyBuffer>(1).value());
      const Plan& plan = GetPlan(cell, Pass::kGrad, s);
      const Descs plain(cell, s, tag::ldigo);
      dnnl::stream stream(Engine());
      auto io = BindInputs(plan, plain, c, stream, args);
      io[DNNL_ARG_DST_LAYER] = Wrap(plain.y, arg(out));
      io[DNNL_ARG_DST_ITER] = Wrap(plain.state, arg(out + 1));
      io[DNNL_ARG_WORKSPACE] = Wrap(plan.pd.workspace_desc(), arg(ws));
      io[DNNL_ARG_DIFF_DST_LAYER] = Wrap(plain.y, arg(d_out));
      io[DNNL_ARG_DIFF_DST_ITER] = Wrap(plain.state, arg(d_out + 1));
      // Outputs: dx, dh0, [dc0], dw_layer, dw_iter, dbias.
      io[DNNL_ARG_DIFF_SRC_LAYER] = Wrap(plain.x, ret(0));
      io[DNNL_ARG_DIFF_SRC_ITER] = Wrap(plain.state, ret(1));
      if (c) {
        io[DNNL_ARG_DST_ITER_C] = Wrap(plain.state, arg(out + 2));
        io[DNNL_ARG_DIFF_DST_ITER_C] = Wrap(plain.state, arg(d_out + 2));
        io[DNNL_ARG_DIFF_SRC_ITER_C] = Wrap(plain.state, ret(2));
      }
      const int dw = 2 + c;
      const memory::desc plain_weights[2] = {plain.w_layer, plain.w_iter};
      const int diff_args[2] = {DNNL_ARG_DIFF_WEIGHTS_LAYER, DNNL_ARG_DIFF_WEIGHTS_ITER};
      memory user_diff[2], diff[2];
      for (int i = 0; i < 2; ++i) {  // oneDNN adds into the weight gradients: they start at 0
        user_diff[i] = Wrap(plain_weights[i], ret(dw + i));
        diff[i] = plan.from_diff_weights[i]
                      ? Wrap(plan.diff_weights[i],
                             Scratch(kDiffWeights + i, plan.diff_weights[i].get_size()))
                      : user_diff[i];
        std::memset(diff[i].get_data_handle(), 0, plan.diff_weights[i].get_size());
        io[diff_args[i]] = diff[i];
      }
      io[DNNL_ARG_DIFF_BIAS] = Wrap(plain.bias, ret(dw + 2));
      std::memset(ret(dw + 2), 0, plain.bias.get_size());
      plan.prim.execute(stream, io);
      for (int i = 0; i < 2; ++i) {
        if (plan.from_diff_weights[i]) plan.from_diff_weights[i]->execute(stream, diff[i], user_diff[i]);
      }
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
    TheWorker().Run([&] {
      bytes = GetPlan(Cell(cell), Pass::kTrain, Shape{t, b, d, h}).pd.workspace_desc().get_size();
    });
    return bytes;
  } catch (const std::exception&) {
    return 0;
  }
}
